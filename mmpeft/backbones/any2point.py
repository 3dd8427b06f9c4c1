"""Any2Point: a frozen 2-D or 1-D transformer as a point-cloud backbone (Tang et al., "Any2Point: Empowering
Any-modality Large Models for Efficient 3D Understanding", ECCV 2024, arXiv 2404.07989; Ivan-Tang-3D/Any2Point,
`models/backbone/pointvit.py`).

A trainable Point-PN tokenizer (`mmpeft.backbones.point_pn`) turns a cloud into tokens and their 3-D centres; the
virtual projection (`mmpeft.backbones.virtual_projection`) reads each token's position off the source's own frozen
position table under six views; a trainable `[cls]` token and position go first (a ViT source's `[cls]` starts from
its pretrained value, as the official checkpoint loading does by name; a source's register tokens follow, frozen,
without a position); the positions are re-added before every one of the source's own blocks (the same modules, under
the source's keys, frozen), then the source's final norm (trained, as the official recipe does) and cls + max pooling.
The tokenizer, `[cls]` token and position and final norm are this backbone's own trainable tensors
(`task_owned`): they train under every method, go in the adapter file, and `disabled()` runs them at their step-0
values. Each token's per-view source coordinates go in the forward context (`ForwardContext.view_coords`), where the
`any2point` method's guided adapter pools by them.

Sources: any timm ViT in the token anatomy (a 2-D source: its patch-position grid; DINOv2-style LayerScale and
registers included; the digits ViT) and open_clip text towers (a 1-D source: the 77-row table; its causal mask is
not used, the tokens are a set). Not copied: the CLIP-text code's frozen `nn.MultiheadAttention` is built without
`batch_first` and handed [B, T, C], so it attends across the samples of a batch (here attention is per sample,
and a batch of one gives the same output as that sample in any batch); the CLIP-text code also adds the positions
once before the blocks as well as before every block (block 0 sees them twice; here once before every block, as the
DINOv2 code does); the hard-coded 128 tokens, `.cuda()` calls and checkpoint paths. The feature is [cls, max]
(the official order is [max, cls]; the head is new either way).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from mmpeft.backbones.point_pn import PointPNTokenizer
from mmpeft.backbones.registry import create_backbone, register_backbone
from mmpeft.backbones.virtual_projection import interpolate_rows, project_1d, project_2d, sample_grid
from mmpeft.core.anatomy import TokenBackbone
from mmpeft.core.context import ForwardContext
from mmpeft.core.errors import NotSupported
from mmpeft.core.identity import record_weights, weights_identity

__all__ = ["Any2Point", "ANY2POINT_HEAD", "source_kind"]

# the official ClsHead: Linear 2C -> 256 (no bias), BN, ReLU, Dropout 0.5, Linear 256 -> 256 (no bias), BN, ReLU,
# Dropout 0.5, Linear 256 -> classes (463,631 parameters for 15 classes at C = 768)
ANY2POINT_HEAD: dict[str, Any] = {"name": "mlp", "hidden": [256, 256], "norm": "batch", "dropout": 0.5,
                                  "activation": "relu", "hidden_bias": False}  # fmt: skip


def source_kind(source: nn.Module) -> str:
    """ "2d" (a ViT with a patch grid and a position table), "1d" (a text tower's position table), or NotSupported."""
    if not isinstance(source, TokenBackbone):
        raise NotSupported(f"Any2Point needs a transformer source in the token anatomy, got {type(source).__name__}")
    if getattr(source, "pos_embed", None) is not None and hasattr(getattr(source, "patch_embed", None), "grid_size"):
        return "2d"
    if getattr(source, "positional_embedding", None) is not None and hasattr(source, "token_embedding"):
        return "1d"
    raise NotSupported(
        f"Any2Point reads token positions off the source's own position table: a timm ViT's patch grid or an "
        f"open_clip text tower's table; {type(source).__name__} ({getattr(source, 'name', '?')}) has neither"
    )


@register_backbone("any2point", description="Any2Point: a frozen 2-D (ViT) or 1-D (CLIP text) transformer on point "
                   "clouds through a Point-PN tokenizer and virtual-projection positions")  # fmt: skip
class Any2Point(TokenBackbone):
    """A frozen source transformer on [B, N, 3] clouds (see the module docstring).

    Args:
        source: the source backbone's registered name ("vit_base_patch14_dinov2", "digits_vit",
            "open_clip:ViT-L-14-quickgelu:text", any timm ViT), or a built one (its modules are taken over).
        weights, pretrained: the source's weights (a local file; mmpeft's quickstart pretraining or the hub), passed
            to it when given.
        source_options: further keyword arguments of the source (e.g. {drop_path_rate: 0.1}).
        num_points: the clouds' size the tokenizer's stages are sized for (1,024: 512 / 256 / 128 centres).
        raw_width, stages, k, stage_blocks, last_bottleneck, normalize: the tokenizer (`PointPNTokenizer`; Any2Point:
            96, 3, 64 or 81, (2, 1, 1), 32, "scan" for ScanObjectNN or "mn40").
        views: virtual views (6).
        shift: a 2-D source's `--trans`, the views' push along z (-1.8 DINOv2 on ScanObjectNN, -1.4 elsewhere).
        direction: a 1-D source's `--pos_cor`, the line the clouds project on ((-1, 0, 1) ScanObjectNN, (1, -1, 0)
            ModelNet40).
        attn_drop: dropout on the source's attention weights (the official DINOv2 recipe: 0.1; CLIP's: none); unset:
            the source's own.
        device: build on this device ("meta" for counts).
    """

    pos_every_block = True
    in_channels = 3

    def __init__(self, source: str | nn.Module = "vit_base_patch14_dinov2", weights: str | None = None,
                 pretrained: bool | str | None = None, source_options: dict[str, Any] | None = None,
                 num_points: int = 1024, raw_width: int = 96, stages: int = 3, k: int = 64,
                 stage_blocks: tuple[int, ...] = (2, 1, 1), last_bottleneck: int = 32, normalize: str = "scan",
                 views: int = 6, shift: float = -1.8, direction: tuple[float, float, float] = (-1.0, 0.0, 1.0),
                 attn_drop: float | None = None, device: str | torch.device | None = None):  # fmt: skip
        super().__init__()
        options = dict(source_options or {})
        if weights is not None:
            options["weights"] = weights
        if pretrained is not None:
            options["pretrained"] = pretrained
        if device is not None:
            options["device"] = device
        if isinstance(source, nn.Module):
            if options:
                raise ValueError(f"source is a built model; weights, pretrained, device and source_options "
                                 f"({sorted(options)}) apply only to a source given by name")  # fmt: skip
            src = source
        else:
            src = create_backbone(source, **options)
        self.kind = source_kind(src)
        self.source = getattr(src, "name", type(src).__name__)
        self.name = f"any2point:{self.source}"
        self.embed_dim, self.num_heads, self.pool_type = src.embed_dim, src.num_heads, "cls+max"
        self.views, self.shift, self.direction = views, shift, tuple(float(d) for d in direction)
        self.default_head = dict(ANY2POINT_HEAD)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.tokenizer = PointPNTokenizer(num_points, src.embed_dim, raw_width, stages, k, tuple(stage_blocks),
                                              last_bottleneck, normalize)  # fmt: skip
            fresh_cls = getattr(src, "cls_token", None) is None
            self.cls_token = nn.Parameter(torch.zeros(1, 1, src.embed_dim)) if fresh_cls else src.cls_token
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, src.embed_dim))
        if self.cls_pos.device.type != "meta":  # the official init: N(0, 0.02); a ViT's [cls] keeps its value
            nn.init.normal_(self.cls_pos, std=0.02)
            if fresh_cls:
                nn.init.normal_(self.cls_token, std=0.02)
        if self.kind == "2d":
            self.pos_embed, self.reg_token = src.pos_embed, getattr(src, "reg_token", None)
            self.num_reg_tokens = getattr(src, "num_reg_tokens", 0)
            self._patch_rows = 0 if src.no_embed_class else src.num_prefix_tokens
            self.grid_size = tuple(src.patch_embed.grid_size)
            self.image_size = tuple(src.patch_embed.img_size)
        else:
            self.positional_embedding, self.reg_token, self.num_reg_tokens = src.positional_embedding, None, 0
        self.blocks, self.norm = src.blocks, src.norm
        if attn_drop is not None:  # unset: the source's own
            for block in self.blocks:
                block.attn.attn_drop = attn_drop
        self.num_points, self.num_group, self.group_size = num_points, self.tokenizer.centres[0], k
        tokenizer = [f"tokenizer.{n}" for n, _ in self.tokenizer.named_parameters()]
        self._task_owned = (*tokenizer, "cls_token", "cls_pos", *(f"norm.{n}" for n, _ in self.norm.named_parameters()))
        self.init_sites()
        record_weights(self, weights_identity(src).source)

    # -- what trains whatever the method --------------------------------------------------------------------------
    def task_owned(self) -> list[str]:
        """Named at construction: a method's pieces attached later (an SSF after the final norm) are not the task's."""
        return list(self._task_owned)

    # -- the forward ----------------------------------------------------------------------------------------------
    def source_positions(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [B, G, C], view coordinates [B, G, V, d]) of token centres [B, G, 3]: the source's table read
        under each view, averaged over the views."""
        if self.kind == "2d":
            coords = project_2d(centres, self.image_size, self.shift, self.views)
            grid = self.pos_embed[0, self._patch_rows :].reshape(*self.grid_size, -1)
            per_view = sample_grid(grid, coords, self.image_size)
        else:
            table = self.positional_embedding
            coords = project_1d(centres, table.shape[0], self.direction, self.views)
            per_view = interpolate_rows(table, coords.squeeze(-1))
        return per_view.mean(dim=2), coords

    def embed(self, xyz: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if xyz.dim() != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"{self.name} takes [B, N, 3] point clouds (xyz), got shape {tuple(xyz.shape)}")
        b = xyz.shape[0]
        tokens, centres = self.tokenizer(xyz)
        with torch.no_grad():  # the projection is frozen and parameter-free (the table is frozen)
            pos, coords = self.source_positions(centres.detach())
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        n_prefix = 1 + self.num_reg_tokens
        ctx.xyz, ctx.centres = xyz, centres
        ctx.positions = torch.cat([self.cls_pos.expand(b, -1, -1), pos.new_zeros(b, self.num_reg_tokens, pos.shape[-1]),
                                   pos.to(tokens.dtype)], dim=1)  # fmt: skip
        ctx.view_coords = torch.cat([coords.new_zeros(b, n_prefix, *coords.shape[2:]), coords], dim=1)
        ctx.token_meta["centres"] = torch.cat([centres.new_zeros(b, n_prefix, 3), centres], dim=1)
        ctx.layout["cls"] = slice(0, 1)
        if self.num_reg_tokens:
            ctx.layout["registers"] = slice(1, n_prefix)
        ctx.layout["patches"] = slice(n_prefix, n_prefix + tokens.shape[1])
        return torch.cat([*prefix, tokens], dim=1)

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, self.num_points, 3, generator=generator)

    def input_layer(self) -> str:
        return "tokenizer.raw.0"
