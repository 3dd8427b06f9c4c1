"""Any2Point's any-to-3D guided adapter (Tang et al., "Any2Point: Empowering Any-modality Large Models for
Efficient 3D Understanding", ECCV 2024, arXiv 2404.07989; code Ivan-Tang-3D/Any2Point, `models/layers/attention.py`,
`Block.forward`), on the `any2point` backbone (`mmpeft.backbones.any2point`).

After every block's FFN: x <- x + h + s * A(h), with h the FFN branch after LayerScale (and drop-path) and A a
bottleneck without its own residual (D -> r -> D, QuickGELU, dropout 0.1); then, on the patch tokens only:
- a 3-D branch: tokens pooled per voxel of their centres (max + mean), a per-block BatchNorm + GELU, broadcast back
  (x3d);
- per view j of the backbone's virtual projection: a narrow self-attention among the tokens that share a cell of the
  source's position space (one module per view, shared by all blocks), the mean per cell, a per-block per-view
  BatchNorm + GELU, broadcast back (x_j);
- the view ensemble: w_j = (cos(x_j, x3d) + 1) / 2 normalised over the views, x <- x + c * sum_j w_j x_j.

Pure PyTorch: voxel and cell pooling by `mmpeft.ops.point.cell_ids` / `pool_cells` (no torch-cluster / torch-scatter,
which have no wheels here), the cell mask as a boolean SDPA mask per sample.

Not copied from the official code, and deviations:
- the local attention reshapes its rows as [rows / 128, 128] (a hard-coded token count): here per sample;
- the per-view cell means are taken over every cell of the grid (B x g^2 rows, most of them empty zeros) and the
  BatchNorm's statistics include the empty cells, so they depend on the grid's resolution; here over the occupied
  cells (as the voxel branch already does);
- the local attention has no drop-path (the official applies the block's, 0 in the ScanObjectNN recipes);
- mmpeft's default zero-initialises the adapters' up projections and learns each block's ensemble scale c from zero
  (identity at init over the Any2Point backbone); `paper` keeps the official Xavier inits (zero biases) and the fixed
  c (`--coef_pro`) and adapter scale s (`--scale_factor`).
The official best-epoch selection on the test split is the data protocol's business (`protocol: final` selects on
a validation split carved from train).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.anatomy import ForwardContext
from mmpeft.core.errors import NotSupported
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, Bottleneck, LocalAttention

__all__ = ["Any2PointAdapter", "GuidedAdapter", "cell_index", "cell_mask"]

INITS = ("zero", "official")


def cell_index(ctx: ForwardContext, key: str, coords, size: float) -> tuple[torch.Tensor, int]:
    """(ids [B, G], count) of the occupied cells of side `size` holding the coordinates [B, G, d] that `coords()`
    gives, made once per forward and kept in the context's draws (every block pools by the same cells)."""
    from mmpeft.ops.point import cell_ids

    if key not in ctx.draws:
        ctx.draws[key] = cell_ids(torch.floor(coords() / size).long())
    return ctx.draws[key]


def cell_mask(ctx: ForwardContext, key: str, ids: torch.Tensor) -> torch.Tensor:
    """The local attention's mask [B, G, G] (True: same cell, self included), once per forward and view."""
    if key not in ctx.draws:
        ctx.draws[key] = ids.unsqueeze(2) == ids.unsqueeze(1)
    return ctx.draws[key]


class GuidedAdapter(AdapterModule):
    """Hook on `mlp.parallel` of every block (see the module docstring). Block 0's owns the per-view local
    attentions that all blocks share."""

    def __init__(self, dim: int, hidden: int, views: int, dropout: float, scale: float, ensemble: float, init: str,
                 voxel: float, cell: float, local_width: int, local_heads: int, shared: nn.ModuleList | None,
                 device=None):  # fmt: skip
        super().__init__()
        self.scale, self.voxel, self.cell = scale, voxel, cell
        self.adapter = Bottleneck(dim, hidden, activation="quick_gelu", dropout=dropout,
                                  init="xavier" if init == "official" else "zero_up", device=device)  # fmt: skip
        if init == "official" and self.adapter.up.weight.device.type != "meta":
            nn.init.zeros_(self.adapter.down.bias)  # the official PointViT init pass zeroes every Linear's bias
            nn.init.zeros_(self.adapter.up.bias)
        if shared is None:
            self.local = nn.ModuleList(LocalAttention(dim, local_width, local_heads, qkv_bias=True, device=device)
                                       for _ in range(views))  # fmt: skip
            if init == "official" and self.adapter.up.weight.device.type != "meta":
                for attn in self.local:
                    for lin in (attn.qkv, attn.proj):
                        nn.init.xavier_uniform_(lin.weight)
                        nn.init.zeros_(lin.bias)
        else:
            object.__setattr__(self, "_local", shared)
        self.norm3d = nn.BatchNorm1d(dim, device=device)
        self.norm_views = nn.ModuleList(nn.BatchNorm1d(dim, device=device) for _ in range(views))
        if init == "zero":  # learnt from zero: the guided branch starts switched off yet receives gradients
            self.ensemble = nn.Parameter(torch.zeros((), device=device))
        else:
            self.ensemble = ensemble

    @property
    def shared(self) -> nn.ModuleList:
        return getattr(self, "_local", None) or self.local

    def forward(self, z: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        from mmpeft.ops.point import pool_cells

        z = z + self.scale * self.adapter(branch)  # the FFN branch after LayerScale and drop-path (`mlp.parallel`)
        patches = ctx.span("patches")
        x = z[:, patches]
        coords = ctx.view_coords[:, patches]

        def voxel_coords() -> torch.Tensor:  # voxels counted from each cloud's own corner
            centres = ctx.token_meta["centres"][:, patches]
            return centres - centres.amin(dim=1, keepdim=True)

        ids, count = cell_index(ctx, "any2point.voxels", voxel_coords, self.voxel)
        pooled = pool_cells(x, ids, count, "max") + pool_cells(x, ids, count, "mean")
        x3d = F.gelu(self.norm3d(pooled))[ids]  # [B, G, D]
        parts, weights = [], []
        for j, (attn, norm) in enumerate(zip(self.shared, self.norm_views, strict=True)):
            cells, n = cell_index(ctx, f"any2point.cells.{j}", lambda j=j: coords[:, :, j], self.cell)
            local = attn(x, mask=cell_mask(ctx, f"any2point.mask.{j}", cells))
            part = F.gelu(norm(pool_cells(local, cells, n, "mean")))[cells]
            parts.append(part)
            weights.append((F.cosine_similarity(part, x3d, dim=-1) + 1) / 2)
        w = torch.stack(weights, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        update = torch.einsum("bgv,vbgd->bgd", w, torch.stack(parts))
        return torch.cat([z[:, : patches.start], x + self.ensemble * update, z[:, patches.stop :]], dim=1)


@register_method
@dataclass
class Any2PointAdapter(Method):
    """The any-to-3D guided adapter in every block of the `any2point` backbone (see the module docstring for the
    parts, what is not copied and the deviations). Trainable without the head on DINOv2 ViT-B/14 (r = 8) and CLIP-L/14
    text (r = 16), `paper` preset: 800,760 and 948,312 (the backbone's tokenizer, [cls] token and position and final
    norm included, as the official count); the default adds one learnt ensemble scale per block."""

    name: ClassVar[str] = "any2point"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    needs_points: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"init": "official"}}

    r: int = field(default=8, metadata={"help": "the FFN adapter's bottleneck (DINOv2: 8; CLIP text: 16)"})
    scale: float = field(default=0.3, metadata={"help": "s: the adapter's scale (--scale_factor; 1.0 for MN40 DINOv2)"})
    ensemble: float = field(
        default=0.7, metadata={"help": "c: the view ensemble's scale when fixed (init official; --coef_pro)"}
    )
    voxel: float = field(default=0.16, metadata={"help": "side of the 3-D voxels (--coef_3dgird; CLIP-Scan 0.08)"})
    cell_2d: float = field(default=26.0, metadata={"help": "side of a 2-D source's cells in pixels (--coef_2dgird)"})
    cell_1d: float = field(default=2.0, metadata={"help": "side of a 1-D source's cells in positions (--coef_1dgird)"})
    local_width: int = field(default=12, metadata={"help": "the per-view local attention's width (--attn2d_dim)"})
    local_heads: int = field(default=6, metadata={"help": "its heads (6 heads of 2)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout inside the FFN adapter"})
    init: str = field(
        default="zero",
        metadata={
            "help": (
                '"zero": zero up projections, ensemble scale learnt from 0 (mmpeft); "official": Xavier, fixed '
                "scales (the paper preset)"
            )
        },
    )

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.r < 1 or self.voxel <= 0 or self.cell_2d <= 0 or self.cell_1d <= 0:
            raise ValueError("r must be positive and the voxel and cell sides greater than zero")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def inject(self, backbone: nn.Module) -> None:
        kind = getattr(backbone, "kind", None)
        if not hasattr(backbone, "source_positions") or kind not in ("1d", "2d"):
            raise NotSupported(
                "the any2point method pools tokens by the cells of their virtual projection onto a source's position "
                f"table: it runs on the any2point backbone (backbone: any2point, source: ...), not on "
                f"{type(backbone).__name__}"
            )
        dim, device = backbone.embed_dim, backbone.cls_pos.device
        cell = self.cell_2d if kind == "2d" else self.cell_1d
        shared = None
        for block in backbone.blocks:
            piece = GuidedAdapter(dim, self.r, backbone.views, self.dropout, self.scale, self.ensemble, self.init,
                                  self.voxel, cell, self.local_width, self.local_heads, shared, device)  # fmt: skip
            shared = shared or piece.local
            block.site("mlp.parallel").append(piece)
