"""Pure-PyTorch point-cloud ops: farthest point sampling, kNN, gather and Point-MAE's FPS+kNN `group`.

They replace the compiled `pointnet2_ops` (FPS, gather) and `KNN_CUDA` extensions that Point-MAE,
Point-BERT and Point-PEFT build with nvcc, so the point backbones run on CPU and on any CUDA without a
build step. Everything is batched; the only Python loop is FPS's loop over the picks (inherently serial).
Index outputs carry no gradient; `gather_points` and `group` are differentiable with respect to the points.

Under mixed precision the ops still compute in fp32 (or the inputs' fp64): `farthest_point_sample`, `knn` and
`group` run with autocast switched off (`full_precision`), since autocast would run kNN's distance matmul in
bf16, whose 8-bit mantissa cannot rank neighbours (about half of Point-MAE's 128 x 32 ScanObjectNN groups
changed their neighbour set under CPU bf16 autocast). Only the network around them runs in the lower precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = [
    "farthest_point_sample", "knn", "gather_points", "group", "full_precision", "inverse_distance_weights",
    "cell_ids", "pool_cells",
]  # fmt: skip

P = ParamSpec("P")
R = TypeVar("R")

# kNN materialises a (query x points) distance block per batch. On CPU it is cut into blocks of about this many
# elements: small blocks stay in cache for `topk`, and blocks over glibc's 32 MB mmap threshold would be fresh pages
# (page faults) on every call, which alone cost about as much as the distances at B=32, N=2048, G=128.
_CPU_BLOCK_ELEMENTS = 1 << 20
_DEVICE_BLOCK_ELEMENTS = 1 << 26


def full_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with autocast off on the device of its first tensor argument, so its arithmetic happens in the
    inputs' own dtype (fp32 for the point ops) whatever the caller's autocast state."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Distances in fp32 for half/bf16 inputs (their mantissa cannot rank nearby points); fp32/fp64 as given."""
    if not x.is_floating_point():
        raise TypeError(f"point coordinates must be a floating-point tensor, got {x.dtype}")
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_points(x: Tensor, name: str, dims: int | None = 3) -> None:
    if x.dim() != 3 or (dims is not None and x.shape[-1] != dims):
        want = f"[B, N, {dims}]" if dims is not None else "[B, N, D]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")


def _start_indices(start: int | Tensor, batch: int, num_points: int, device: torch.device) -> Tensor:
    """The first pick of every sample as a LongTensor[B, 1]; a wrong index would otherwise fail later as an
    opaque gather error (or a device-side assert on CUDA)."""
    if isinstance(start, Tensor):
        if start.shape != (batch,) or start.is_floating_point() or start.is_complex() or start.dtype == torch.bool:
            raise ValueError(
                f"start must be an int or an integer tensor of shape [B]=[{batch}], "
                f"got {start.dtype} of shape {list(start.shape)}"
            )
        if batch and bool(((start < 0) | (start >= num_points)).any()):
            raise ValueError(
                f"start indices must lie in [0, {num_points}), got min {int(start.min())}, max {int(start.max())}"
            )
        return start.to(device=device, dtype=torch.long).view(batch, 1)
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"start must be an int or a LongTensor[B], got {type(start).__name__}")
    if not 0 <= start < num_points:
        raise ValueError(f"start={start} is not a point index: the clouds have N={num_points} points")
    return torch.full((batch, 1), start, dtype=torch.long, device=device)


@full_precision
def farthest_point_sample(xyz: Tensor, num: int, start: int | Tensor = 0) -> Tensor:
    """Indices [B, num] of `num` points picked by farthest point sampling, in pick order.

    Each step picks the point farthest (largest squared Euclidean distance) from everything picked so far,
    keeping a running minimum distance per point; ties go to the lowest index. `start` is the first pick:
    an int for every sample (0 is what `pointnet2_ops.furthest_point_sample` does, so the start is random only
    because training shuffles the points) or a LongTensor[B] of per-sample starts. Unlike pointnet2_ops, points
    near the origin are not skipped. Once every remaining point coincides with a picked one (num larger than the
    number of distinct points) the pick repeats index 0.

    xyz: [B, N, 3]; 1 <= num <= N. Half/bf16 inputs are compared in fp32.
    """
    _check_points(xyz, "xyz")
    batch, num_points, _ = xyz.shape
    if not 1 <= num <= num_points:
        raise ValueError(f"farthest_point_sample: num={num} must be in 1..N, and the clouds have N={num_points} points")
    far = _start_indices(start, batch, num_points, xyz.device)
    # Planar x, y, z rows [B, N] make every step a few flat elementwise ops (the [B, N, 3] layout's reduction over
    # a last dim of 3 is several times slower); buffers are reused, so the loop allocates almost nothing.
    x, y, z = xyz.detach().to(_compute_dtype(xyz)).permute(2, 0, 1).contiguous().unbind(0)
    min_dist = torch.full_like(x, float("inf"))
    dist = torch.empty_like(x)
    tmp = torch.empty_like(x)
    picks = [far]
    for _ in range(num - 1):
        torch.sub(x, x.gather(1, far), out=dist)
        dist.mul_(dist)
        torch.sub(y, y.gather(1, far), out=tmp)
        dist.addcmul_(tmp, tmp)
        torch.sub(z, z.gather(1, far), out=tmp)
        dist.addcmul_(tmp, tmp)
        torch.minimum(min_dist, dist, out=min_dist)
        far = min_dist.argmax(dim=1, keepdim=True)
        picks.append(far)
    return torch.cat(picks, dim=1)


@full_precision
def knn(query: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices [B, G, k] of the k points nearest (Euclidean) to each query point, nearest first.

    Candidates come from ||p||^2 - 2 q.p (one batched matmul on per-sample centred coordinates, so the ranking
    is as good as the data's spread allows) and `topk`; the k winners are then re-sorted by their exact squared
    distance sum((p - q)^2). Hence a query that is one of the points is its own first neighbour (distance exactly
    0; an exact duplicate may take its place, with the same coordinates), which the relative neighbourhoods of
    `group` rely on. Points whose distances differ by rounding error only may be swapped at the k-th place.

    query: [B, G, D]; points: [B, N, D] (D = 3 for xyz); 1 <= k <= N. Half/bf16 inputs are compared in fp32.
    """
    _check_points(query, "query", dims=None)
    _check_points(points, "points", dims=None)
    if query.shape[0] != points.shape[0] or query.shape[2] != points.shape[2]:
        raise ValueError(
            f"knn: query {list(query.shape)} and points {list(points.shape)} must agree in batch size and point dim"
        )
    batch, num_query, _ = query.shape
    num_points = points.shape[1]
    if not 1 <= k <= num_points:
        raise ValueError(f"knn: k={k} must be in 1..N, and the clouds have N={num_points} points")
    dtype = _compute_dtype(points)
    q = query.detach().to(dtype)
    p = points.detach().to(dtype)
    # Centring each sample shrinks ||p||^2 and with it the rounding error of the expanded form.
    origin = p.mean(dim=1, keepdim=True)
    qc, pc = q - origin, p - origin
    sq_norm = pc.square().sum(-1).unsqueeze(1)  # [B, 1, N]; ||q||^2 is constant per row and does not rank
    pc_t = pc.transpose(1, 2)
    budget = _CPU_BLOCK_ELEMENTS if p.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    step = max(1, budget // max(1, batch * num_points))
    blocks = [
        torch.baddbmm(sq_norm, qc[:, g : g + step], pc_t, alpha=-2).topk(k, dim=-1, largest=False, sorted=False).indices
        for g in range(0, num_query, step)
    ]
    cand = torch.cat(blocks, dim=1) if blocks else torch.empty(batch, 0, k, dtype=torch.long, device=p.device)
    exact = (gather_points(p, cand) - q.unsqueeze(2)).square().sum(-1)
    order = exact.sort(dim=-1, stable=True).indices
    return cand.gather(-1, order)


def gather_points(points: Tensor, index: Tensor) -> Tensor:
    """Rows of `points` [B, N, C] at `index` [B, ...] (per sample), as [B, ..., C]; differentiable in `points`.

    The pure-PyTorch stand-in for pointnet2_ops' `gather_operation` (which works on [B, C, N]).
    """
    if points.dim() != 3:
        raise ValueError(f"points must have shape [B, N, C], got {list(points.shape)}")
    if index.dim() < 1 or index.shape[0] != points.shape[0]:
        raise ValueError(f"index must have shape [B, ...] with B={points.shape[0]}, got {list(index.shape)}")
    batch, _, channels = points.shape
    flat = index.reshape(batch, -1, 1).to(torch.long)
    out = points.gather(1, flat.expand(-1, -1, channels))
    return out.view(*index.shape, channels)


@full_precision
def group(xyz: Tensor, num_groups: int, group_size: int, start: int | Tensor = 0) -> tuple[Tensor, Tensor]:
    """Point-MAE's `Group`: (neighbourhood [B, G, k, 3], centre [B, G, 3]) in that order.

    Centres are `num_groups` FPS picks (`start` as in `farthest_point_sample`); each neighbourhood is the
    `group_size` points nearest its centre among all N points (groups overlap), minus the centre, so row 0 of
    every neighbourhood is exactly zero (the centre is its own first neighbour).
    """
    _check_points(xyz, "xyz")
    num_points = xyz.shape[1]
    if not 1 <= num_groups <= num_points or not 1 <= group_size <= num_points:
        raise ValueError(
            f"group: num_groups={num_groups} and group_size={group_size} must each be in 1..N, "
            f"and the clouds have N={num_points} points"
        )
    centre = gather_points(xyz, farthest_point_sample(xyz, num_groups, start))
    neighbourhood = gather_points(xyz, knn(centre, xyz, group_size)) - centre.unsqueeze(2)
    return neighbourhood, centre


def inverse_distance_weights(to_xyz: Tensor, from_xyz: Tensor, eps: float = 1e-8) -> Tensor:
    """Weights [B, N, S] that carry features of S points to N points: each row is 1 / (squared distance + eps) over
    *all* S points, normalised to sum to 1 (Point-PEFT's propagation; PointNet++ keeps only the 3 nearest)."""
    _check_points(to_xyz, "to_xyz")
    _check_points(from_xyz, "from_xyz")
    dtype = _compute_dtype(to_xyz)
    a, b = to_xyz.to(dtype), from_xyz.to(dtype)
    squared = (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)  # exact differences: no cancellation near 0
    weights = 1.0 / (squared + eps)
    return (weights / weights.sum(-1, keepdim=True)).to(to_xyz.dtype)


def cell_ids(cells: Tensor) -> tuple[Tensor, int]:
    """Dense ids [B, G] of the occupied (sample, cell) pairs of integer cell coordinates `cells` [B, G, d], and their
    count: the pure-PyTorch stand-in for torch_geometric's `voxel_grid` + `torch.unique` (and torch-cluster behind
    it). Cells never span samples, so pooling by these ids keeps every sample independent of the rest."""
    if cells.dim() != 3 or cells.is_floating_point():
        raise ValueError(f"cells must be integer coordinates [B, G, d], got {cells.dtype} {list(cells.shape)}")
    b, g, d = cells.shape
    sample = torch.arange(b, device=cells.device).view(b, 1, 1).expand(b, g, 1)
    _, inverse = torch.unique(torch.cat([sample, cells.long()], dim=-1).reshape(b * g, d + 1), dim=0,
                              return_inverse=True)  # fmt: skip
    return inverse.view(b, g), int(inverse.max()) + 1 if inverse.numel() else 0


def pool_cells(x: Tensor, ids: Tensor, count: int, reduce: str) -> Tensor:
    """Per cell, the "mean" or "max" of the rows of `x` [B, G, C] whose `ids` [B, G] (from `cell_ids`) name it:
    [count, C] (torch_scatter's `scatter_mean` / `segment_csr(reduce="max")` in pure PyTorch)."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    channels = x.shape[-1]
    index = ids.reshape(-1, 1).expand(-1, channels)
    out = x.new_zeros(count, channels)
    return out.scatter_reduce(0, index, x.reshape(-1, channels), "mean" if reduce == "mean" else "amax",
                              include_self=False)  # fmt: skip
