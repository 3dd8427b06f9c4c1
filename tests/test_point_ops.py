"""Pure-PyTorch FPS / kNN / group (mmpeft.ops.point) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft.ops import point as point_ops
from mmpeft.ops.point import farthest_point_sample, gather_points, group, knn


def _cloud(batch: int, num: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, num, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _ref_fps(pts: np.ndarray, num: int, start: int) -> tuple[list[int], list[float]]:
    """Textbook FPS on one cloud in float64: the picks and each pick's distance to the earlier picks."""
    picks, at_pick = [start], [np.inf]
    min_dist = np.full(len(pts), np.inf)
    for _ in range(num - 1):
        min_dist = np.minimum(min_dist, ((pts - pts[picks[-1]]) ** 2).sum(-1))
        nxt = int(np.argmax(min_dist))
        picks.append(nxt)
        at_pick.append(float(min_dist[nxt]))
    return picks, at_pick


def _dist_at_pick(pts: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Squared distance of each pick (after the first) to its nearest earlier pick."""
    sel = pts[picks]
    d = ((sel[:, None] - sel[None]) ** 2).sum(-1)
    return np.array([d[i, :i].min() for i in range(1, len(picks))])


def _per_sample_starts(batch: int, num_points: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(num_points, (batch,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True])
def test_fps_matches_bruteforce(dtype, per_sample):
    xyz = _cloud(4, 60, seed=2, dtype=dtype)
    start = _per_sample_starts(4, 60) if per_sample else 0
    idx = farthest_point_sample(xyz, 25, start)
    assert idx.shape == (4, 25) and idx.dtype == torch.long
    for b in range(4):
        s = int(start[b]) if per_sample else 0
        ref, _ = _ref_fps(xyz[b].double().numpy(), 25, s)
        assert idx[b].tolist() == ref
        assert int(idx[b, 0]) == s


@pytest.mark.parametrize("start", [0, 7, "per_sample"])
def test_fps_indices_distinct_in_range_and_deterministic(start):
    xyz = _cloud(3, 100, seed=3)
    start = _per_sample_starts(3, 100) if start == "per_sample" else start
    idx = farthest_point_sample(xyz, 40, start)
    assert ((idx >= 0) & (idx < 100)).all()
    for row in idx:
        assert len(set(row.tolist())) == 40
    first = start if isinstance(start, torch.Tensor) else torch.full((3,), start)
    assert torch.equal(idx[:, 0], first)
    assert torch.equal(farthest_point_sample(xyz, 40, start), idx)


@pytest.mark.parametrize("start", [0, "per_sample"])
def test_fps_full_size_is_a_permutation(start):
    xyz = _cloud(2, 33, seed=4)
    start = _per_sample_starts(2, 33) if start == "per_sample" else start
    idx = farthest_point_sample(xyz, 33, start)
    for row in idx:
        assert sorted(row.tolist()) == list(range(33))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 0.0), (torch.float32, 1e-6)])
def test_fps_distance_at_pick_non_increasing(dtype, tol):
    xyz = _cloud(3, 200, seed=5, dtype=dtype)
    idx = farthest_point_sample(xyz, 64)
    for b in range(3):
        d = _dist_at_pick(xyz[b].double().numpy(), idx[b].numpy())
        assert (d > 0).all()
        assert (np.diff(d) <= tol).all()


def test_fps_repeats_only_when_points_run_out():
    # 5 distinct points, each present twice: the first 5 picks are the 5 distinct locations
    base = _cloud(1, 5, seed=6)
    xyz = torch.cat([base, base], dim=1)
    idx = farthest_point_sample(xyz, 5)
    assert len({tuple(xyz[0, i].tolist()) for i in idx[0].tolist()}) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_matches_bruteforce_argsort(dtype):
    points = _cloud(3, 80, seed=7, dtype=dtype)
    query = _cloud(3, 10, seed=8, dtype=dtype)
    idx = knn(query, points, 12)
    assert idx.shape == (3, 10, 12) and idx.dtype == torch.long
    q, p = query.double().numpy(), points.double().numpy()
    for b in range(3):
        d = ((q[b][:, None] - p[b][None]) ** 2).sum(-1)
        assert np.array_equal(idx[b].numpy(), np.argsort(d, axis=-1, kind="stable")[:, :12])


def test_knn_blocked_path_matches_single_block(monkeypatch):
    points = _cloud(2, 64, seed=9)
    query = _cloud(2, 21, seed=10)
    whole = knn(query, points, 9)
    monkeypatch.setattr(point_ops, "_CPU_BLOCK_ELEMENTS", 3 * 2 * 64)  # blocks of 3 queries, the last one ragged
    assert torch.equal(knn(query, points, 9), whole)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_knn_query_point_is_its_own_first_neighbour(offset):
    # a far-off-origin cloud stresses the ||a||^2 + ||b||^2 - 2ab form; a dense one makes near-ties likely
    points = _cloud(4, 512, seed=11) * 0.1 + offset
    sel = torch.randint(512, (4, 100), generator=torch.Generator().manual_seed(12))
    idx = knn(gather_points(points, sel), points, 8)
    assert torch.equal(idx[..., 0], sel)


@pytest.mark.parametrize("per_sample", [False, True])
def test_group_centres_rows_and_radius(per_sample):
    xyz = _cloud(3, 256, seed=13)
    start = _per_sample_starts(3, 256) if per_sample else 0
    neighbourhood, centre = group(xyz, 32, 16, start)
    assert neighbourhood.shape == (3, 32, 16, 3) and centre.shape == (3, 32, 3)
    assert torch.equal(centre, gather_points(xyz, farthest_point_sample(xyz, 32, start)))
    assert torch.equal(neighbourhood[:, :, 0], torch.zeros(3, 32, 3))
    # nearest first, and no point outside the group is closer than the group's k-th neighbour
    dist = neighbourhood.square().sum(-1)
    assert (dist.diff(dim=-1) >= 0).all()
    all_dist = (xyz.unsqueeze(1) - centre.unsqueeze(2)).square().sum(-1)  # [B, G, N]
    inside = torch.zeros_like(all_dist, dtype=torch.bool).scatter_(-1, knn(centre, xyz, 16), True)
    assert (all_dist[~inside].view(3, 32, -1) >= dist[..., -1:]).all()
    assert torch.equal(neighbourhood, gather_points(xyz, knn(centre, xyz, 16)) - centre.unsqueeze(2))


def test_group_row_zero_with_duplicate_points_and_offset():
    base = _cloud(2, 64, seed=14) + 500.0
    xyz = torch.cat([base, base.flip(1)], dim=1)  # every point twice
    neighbourhood, _ = group(xyz, 16, 8)
    assert torch.equal(neighbourhood[:, :, 0], torch.zeros(2, 16, 3))


def test_batch_shuffle_permutes_outputs():
    xyz = _cloud(5, 128, seed=15)
    start = _per_sample_starts(5, 128)
    perm = torch.tensor([3, 0, 4, 1, 2])
    idx = farthest_point_sample(xyz, 20, start)
    assert torch.equal(farthest_point_sample(xyz[perm], 20, start[perm]), idx[perm])
    query = _cloud(5, 7, seed=16)
    assert torch.equal(knn(query[perm], xyz[perm], 5), knn(query, xyz, 5)[perm])
    nb, ce = group(xyz, 16, 8, start)
    nb_p, ce_p = group(xyz[perm], 16, 8, start[perm])
    assert torch.equal(nb_p, nb[perm]) and torch.equal(ce_p, ce[perm])


def test_dtypes():
    xyz64 = _cloud(2, 64, seed=17, dtype=torch.float64)
    nb, ce = group(xyz64, 8, 4)
    assert nb.dtype == ce.dtype == torch.float64
    assert torch.equal(nb[:, :, 0], torch.zeros(2, 8, 3, dtype=torch.float64))
    nb16, ce16 = group(xyz64.to(torch.bfloat16), 8, 4)
    assert nb16.dtype == ce16.dtype == torch.bfloat16
    assert torch.equal(nb16[:, :, 0], torch.zeros(2, 8, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="floating-point"):
        farthest_point_sample(torch.zeros(1, 4, 3, dtype=torch.long), 2)


def test_point_ops_compute_in_fp32_under_bf16_autocast():
    """Autocast would run kNN's distance matmul in bf16 (about half of the 128 x 32 groups of a 2,048-point cloud
    then changed their neighbour set); the ops switch it off, so the groups are exactly the fp32 ones."""
    xyz = torch.randn(4, 2048, 3, generator=torch.Generator().manual_seed(21))
    nb, ce = group(xyz, 128, 32)
    idx, picks = knn(ce, xyz, 32), farthest_point_sample(xyz, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        nb_a, ce_a = group(xyz, 128, 32)
        idx_a, picks_a = knn(ce, xyz, 32), farthest_point_sample(xyz, 128)
        assert torch.is_autocast_enabled("cpu"), "autocast is restored for the network around the ops"
    assert torch.equal(picks_a, picks) and torch.equal(ce_a, ce)
    assert torch.equal(idx_a, idx), "the same neighbours in the same order"
    assert nb_a.dtype == torch.float32 and torch.equal(nb_a, nb)


def test_gather_points_shapes_and_gradient():
    points = _cloud(2, 10, seed=18).requires_grad_()
    index = torch.tensor([[[1, 2], [3, 3]], [[0, 9], [9, 9]]])
    out = gather_points(points, index)
    assert out.shape == (2, 2, 2, 3)
    assert torch.equal(out, points[torch.arange(2)[:, None, None], index])
    out.sum().backward()
    assert points.grad[1, 9].tolist() == [3.0, 3.0, 3.0] and points.grad[0, 5].tolist() == [0.0, 0.0, 0.0]
    nb, ce = group(points, 4, 3)
    (nb.sum() + ce.sum()).backward()  # differentiable in the points, indices carry no graph


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: farthest_point_sample(x, 0), r"num=0 must be in 1\.\.N.*N=16"),
        (lambda x: farthest_point_sample(x, 17), r"num=17 must be in 1\.\.N.*N=16"),
        (lambda x: farthest_point_sample(x[..., :2], 4), r"xyz must have shape \[B, N, 3\], got \[2, 16, 2\]"),
        (lambda x: farthest_point_sample(x[0], 4), r"xyz must have shape \[B, N, 3\], got \[16, 3\]"),
        (lambda x: farthest_point_sample(x, 4, 16), r"start=16 is not a point index.*N=16"),
        (lambda x: farthest_point_sample(x, 4, torch.tensor([0, 16])), r"start indices must lie in \[0, 16\)"),
        (lambda x: farthest_point_sample(x, 4, torch.tensor([0])), r"integer tensor of shape \[B\]=\[2\]"),
        (lambda x: farthest_point_sample(x, 4, torch.tensor([0.0, 1.0])), r"integer tensor"),
        (lambda x: knn(x, x, 17), r"k=17 must be in 1\.\.N.*N=16"),
        (lambda x: knn(x, x, 0), r"k=0 must be in 1\.\.N"),
        (lambda x: knn(x[:1], x, 3), r"must agree in batch size"),
        (lambda x: knn(x[..., :2], x, 3), r"must agree in batch size and point dim"),
        (lambda x: group(x, 17, 4), r"num_groups=17 and group_size=4 must each be in 1\.\.N.*N=16"),
        (lambda x: group(x, 4, 17), r"group_size=17"),
        (
            lambda x: gather_points(x, torch.zeros(3, 4, dtype=torch.long)),
            r"index must have shape \[B, \.\.\.\] with B=2",
        ),
    ],
)
def test_bad_sizes_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_cloud(2, 16, seed=19))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    xyz = _cloud(4, 512, seed=20)
    start = _per_sample_starts(4, 512)
    nb, ce = group(xyz, 64, 16, start)
    nb_c, ce_c = group(xyz.cuda(), 64, 16, start.cuda())
    assert torch.equal(ce_c.cpu(), ce)
    assert torch.equal(nb_c[:, :, 0].cpu(), torch.zeros(4, 64, 3))
    torch.testing.assert_close(nb_c.cpu(), nb)
