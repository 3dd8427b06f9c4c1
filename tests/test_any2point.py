"""Any2Point: the backbone (Point-PN tokenizer, virtual projection, a frozen source's blocks), the guided adapter, and
the official bugs not copied (spec: point.md section 3)."""

from __future__ import annotations

import pytest
import torch

from mmpeft.backbones import Any2Point
from mmpeft.backbones.point_pn import PointPNTokenizer, geometry_encoding
from mmpeft.backbones.virtual_projection import (
    interpolate_rows,
    project_1d,
    project_2d,
    sample_grid,
    view_rotations,
)
from mmpeft.core.context import ForwardContext
from mmpeft.core.heads import build_head, head_spec
from mmpeft.core.model import PeftModel
from mmpeft.ops.point import cell_ids, pool_cells
from tests.conftest import tiny_any2point

# -- exact counts at full size (meta) -----------------------------------------------------------------------------


def _trainable_without_head(source: str, r: int, preset: str = "paper") -> int:
    backbone = Any2Point(source, device="meta")
    model = PeftModel(backbone, {"name": "any2point", "preset": preset, "r": r})
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in model.trainable_names() if not n.startswith("head."))


def test_tokenizer_has_276672_parameters():
    assert sum(p.numel() for p in PointPNTokenizer().parameters()) == 276_672


@pytest.mark.parametrize(
    ("source", "r", "count"),
    [("vit_base_patch14_dinov2", 8, 800_760), ("open_clip:ViT-L-14:text", 16, 948_312)],
    ids=["dinov2_b14_r8", "clip_l14_text_r16"],
)
def test_paper_counts_without_head(source, r, count):
    """The README's #Param: tokenizer, [cls] token and position, final norm, adapters, per-block BatchNorms, the six
    shared local attentions and their norms (spec 3.5); mmpeft's default adds one learnt ensemble scale per block."""
    assert _trainable_without_head(source, r) == count
    assert _trainable_without_head(source, r, preset="default") == count + 12


def test_head_is_the_official_cls_head():
    backbone = Any2Point(device="meta")
    head = build_head(head_spec(backbone.default_head, 15), backbone.num_features)
    assert backbone.num_features == 1536
    assert sum(p.numel() for p in head.parameters()) == 463_631


# -- the tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_stages_halve_the_centres_and_keep_flat_neighbourhoods_finite():
    tokenizer = PointPNTokenizer(num_points=128, out_dim=48, raw_width=6, stages=3, k=8, last_bottleneck=8).eval()
    assert tokenizer.centres == [64, 32, 16] and isinstance(tokenizer.proj, torch.nn.Identity)  # 6 -> 12, 24, 48
    cloud = torch.randn(2, 128, 3)
    cloud[:, :, 2] = 0.0  # a flat cloud: every neighbourhood has zero extent along z
    tokens, centres = tokenizer(cloud)
    assert tokens.shape == (2, 16, 48) and centres.shape == (2, 16, 3)
    assert torch.isfinite(tokens).all()
    enc = geometry_encoding(torch.zeros(1, 2, 3, 3), 12)
    assert enc.shape == (1, 12, 2, 3) and torch.equal(enc[0, :, 0, 0], torch.tensor([0.0, 0, 1, 1] * 3))


# -- virtual projection -------------------------------------------------------------------------------------------


def test_integer_1d_positions_return_exact_table_rows():
    table = torch.randn(77, 8)
    positions = torch.arange(77, dtype=torch.float32)
    assert torch.equal(interpolate_rows(table, positions), table)  # never the official zero rows
    half = interpolate_rows(table, torch.tensor([2.5]))
    torch.testing.assert_close(half[0], (table[2] + table[3]) / 2)


def test_grid_pixels_return_exact_grid_cells():
    """For a grid of g cells on an H-pixel image, pixel (H - 1) * j / (g - 1) returns cell j (align_corners)."""
    grid = torch.randn(4, 5, 6)  # 4 rows x 5 columns of 6-d positions
    height, width = 8, 10
    cols = torch.tensor([(width - 1) * j / 4 for j in range(5)])
    rows = torch.tensor([(height - 1) * i / 3 for i in range(4)])
    pixels = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1).reshape(1, -1, 2)  # (col, row) pairs
    out = sample_grid(grid, pixels, (height, width)).reshape(4, 5, 6)
    torch.testing.assert_close(out, grid, atol=1e-6, rtol=0)


def test_projections_are_per_sample_and_parameter_free():
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 32, 3, generator=g)
    for project in (lambda c: project_2d(c, (518, 518), -1.8), lambda c: project_1d(c, 77, (-1.0, 0.0, 1.0))):
        together = project(batch)
        alone = torch.cat([project(batch[i : i + 1]) for i in range(8)])
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    coords_1d = project_1d(batch, 77, (1.0, -1.0, 0.0))
    assert coords_1d.min() >= 0 and coords_1d.max() <= 76 and coords_1d.shape == (8, 32, 6, 1)
    rot = view_rotations()
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(6, 3, 3), atol=1e-6, rtol=0)
    backbone = tiny_any2point()
    before = sum(p.numel() for p in backbone.parameters())
    pos, coords = backbone.source_positions(torch.randn(2, 16, 3))
    assert sum(p.numel() for p in backbone.parameters()) == before and coords.shape == (2, 16, 6, 2)


def test_identical_views_average_to_that_views_position():
    backbone = tiny_any2point(text=True)
    centres = torch.randn(2, 16, 3)
    pos, coords = backbone.source_positions(centres)
    per_view = interpolate_rows(backbone.positional_embedding, coords.squeeze(-1))
    torch.testing.assert_close(pos, per_view.mean(dim=2))
    same = interpolate_rows(backbone.positional_embedding, coords[:, :, :1].expand(-1, -1, 6, 1).squeeze(-1))
    torch.testing.assert_close(same.mean(dim=2), same[:, :, 0])


# -- the backbone -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True], ids=["2d", "text"])
def test_batch_shuffle_permutes_outputs_and_a_batch_of_one_matches(text):
    """Shuffling the batch permutes the outputs identically (the official CLIP-text code's batch-axis attention would
    fail this), and a cloud alone gives its output in a batch of eight; the guided adapter runs (paper inits)."""
    torch.manual_seed(0)
    model = PeftModel(tiny_any2point(text=text), {"name": "any2point", "preset": "paper"}, num_classes=5).eval()
    clouds = torch.randn(8, 64, 3)
    perm = torch.randperm(8)
    with torch.no_grad():
        out = model(clouds)
        torch.testing.assert_close(model(clouds[perm]), out[perm], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(clouds[3:4]), out[3:4], atol=1e-5, rtol=0)


def test_source_blocks_keep_their_keys_and_the_task_owns_tokenizer_cls_and_norm():
    backbone = tiny_any2point()
    keys = set(backbone.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma", "pos_embed", "reg_token", "norm.weight"} <= keys
    owned = set(backbone.task_owned())
    assert {"cls_token", "cls_pos", "norm.weight", "norm.bias", "tokenizer.raw.0.weight"} <= owned
    assert not any(k.startswith("blocks.") or k == "pos_embed" for k in owned)
    model = PeftModel(backbone, "lora", num_classes=5)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert owned <= trainable and not backbone.pos_embed.requires_grad


def test_the_context_carries_view_coordinates_through_token_insertion():
    backbone = tiny_any2point()
    ctx = ForwardContext()
    x = backbone.embed(torch.randn(2, 64, 3), ctx)
    assert ctx.view_coords.shape == (2, x.shape[1], 6, 2)
    patches = ctx.span("patches")
    coords = ctx.view_coords[:, patches].clone()
    x = ctx.insert(x, torch.zeros(2, 4, x.shape[-1]), "prompts", ctx.span("cls").stop)
    assert torch.equal(ctx.view_coords[:, ctx.span("patches")], coords)
    ctx.remove(x, "prompts")
    assert torch.equal(ctx.view_coords[:, ctx.span("patches")], coords)


def test_the_method_refuses_other_backbones():
    from mmpeft.backbones import TimmViT
    from mmpeft.core.errors import NotSupported

    with pytest.raises(NotSupported, match="any2point backbone"):
        PeftModel(TimmViT("test_vit", img_size=32), "any2point", num_classes=3)


# -- cells and voxels ---------------------------------------------------------------------------------------------


def test_cells_never_span_samples_and_tokens_sharing_a_cell_get_one_pooled_feature():
    cells = torch.tensor([[[0, 0], [0, 0], [1, 2]], [[0, 0], [1, 2], [1, 2]]])
    ids, count = cell_ids(cells)
    assert count == 4 and ids[0, 0] == ids[0, 1] and ids[0, 0] != ids[1, 0]
    x = torch.randn(2, 3, 5)
    mean, top = pool_cells(x, ids, count, "mean"), pool_cells(x, ids, count, "max")
    torch.testing.assert_close(mean[ids[0, 0]], x[0, :2].mean(0))
    torch.testing.assert_close(top[ids[1, 1]], x[1, 1:].amax(0))
    broadcast = mean[ids]
    assert torch.equal(broadcast[0, 0], broadcast[0, 1]) and torch.equal(broadcast[1, 1], broadcast[1, 2])
    mask = ids.unsqueeze(2) == ids.unsqueeze(1)  # the local attention's mask: block-diagonal, self included
    assert mask.diagonal(dim1=1, dim2=2).all() and not mask[0, 0, 2] and mask[1, 1, 2]
