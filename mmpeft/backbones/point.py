"""The Point-MAE / Point-BERT point transformer as a `TokenBackbone`.

Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning" (ECCV 2022, arXiv
2203.06604; `models/Point_MAE.py`) and Yu et al., "Point-BERT" (CVPR 2022, arXiv 2111.14819), as the point
PEFT papers use them: FPS picks G centres, kNN groups k points around each (relative to the
centre), a mini-PointNet turns each group into a token (Point-BERT: 256-d, then `reduce_dim` to 384),
a position MLP embeds each centre and is re-added before every block, 12 pre-LN blocks of width 384
with bias-free qkv, a final LayerNorm, and cls + max pooling. Frozen BatchNorms of the mini-PointNet
run in eval mode (the method core's frozen-mode policy), unlike the official fine-tuning code, whose
frozen BatchNorm statistics drift.

State-dict keys are the official ones except one level: the official `blocks.blocks.<i>` (a
`TransformerEncoder` holding a ModuleList) is `blocks.<i>` here, as in every other token backbone;
`load_point_checkpoint` maps it and `official_state_dict` maps it back.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from mmpeft.backbones.registry import register_backbone
from mmpeft.backbones.weights import optional_path, read_state_dict
from mmpeft.core.anatomy import Attention, TokenBackbone, TokenBlock
from mmpeft.core.context import ForwardContext
from mmpeft.core.errors import ConfigMismatch, UnknownName, WeightsUnavailable
from mmpeft.core.heads import read_checkpoint_head
from mmpeft.core.identity import record_weights

__all__ = [
    "PointTransformer",
    "MiniPointNet",
    "POINT_VARIANTS",
    "POINT_HEADS",
    "load_point_checkpoint",
    "official_state_dict",
]

# variant -> (mini-PointNet width, reduce_dim to the transformer width?)
POINT_VARIANTS: dict[str, dict[str, Any]] = {
    "point_mae": {"encoder_dims": 384, "reduce_dim": False},
    "point_bert": {"encoder_dims": 256, "reduce_dim": True},
}
# The papers' classification heads (the official models' `cls_head_finetune`), as head specs of `mmpeft.core.heads`:
# Point-MAE (also Point-PEFT, M2AE): Linear 768->256, BN, ReLU, Dropout 0.5, Linear 256->256, BN, ReLU,
# Dropout 0.5, Linear 256->C. Point-BERT: Linear 768->256, ReLU, Dropout 0.5, Linear 256->C.
POINT_HEADS: dict[str, dict[str, Any]] = {
    "point_mae": {"name": "mlp", "hidden": [256, 256], "norm": "batch", "dropout": 0.5, "activation": "relu"},
    "point_bert": {"name": "mlp", "hidden": [256], "norm": "none", "dropout": 0.5, "activation": "relu"},
}
FPS_STARTS = ("first", "random")


class MiniPointNet(nn.Module):
    """The per-group token embedding (the official "Encoder"): a shared point MLP, max over the group,
    the group's summary concatenated back onto every point, a second point MLP, max again."""

    def __init__(self, out_dim: int, widths: tuple[int, int, int] = (128, 256, 512)):
        super().__init__()
        a, b, c = widths  # the papers' (128, 256, 512); smaller for the quickstart's tiny transformer
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, a, 1), nn.BatchNorm1d(a), nn.ReLU(inplace=True), nn.Conv1d(a, b, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * b, c, 1), nn.BatchNorm1d(c), nn.ReLU(inplace=True), nn.Conv1d(c, out_dim, 1)
        )
        self.out_dim = out_dim

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """[B, G, k, 3] neighbourhoods -> [B, G, out_dim] tokens."""
        b, g, k, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, k, 3).transpose(1, 2))  # [BG, 256, k]
        summary = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([summary.expand(-1, -1, k), x], dim=1))
        return x.max(dim=2).values.reshape(b, g, self.out_dim)


def _block(dim: int, heads: int, mlp_ratio: float, drop_path: float) -> TokenBlock:
    from timm.layers import DropPath, Mlp  # keeps `import mmpeft` light

    attn = Attention(nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim), heads)
    path = (lambda: DropPath(drop_path)) if drop_path > 0 else nn.Identity
    return TokenBlock(nn.LayerNorm(dim), attn, nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio)), None, None,
                      path(), path())  # fmt: skip


def _encoder_width(variant: str, embed_dim: int, encoder_dims: int | None) -> int:
    """The mini-PointNet's output width: Point-BERT's default 256 (then `reduce_dim`); Point-MAE's tokens enter
    the transformer unchanged, so its width is `embed_dim`, and another one could only fail at the first forward."""
    if POINT_VARIANTS[variant]["reduce_dim"]:
        return encoder_dims or POINT_VARIANTS[variant]["encoder_dims"]
    if encoder_dims is not None and encoder_dims != embed_dim:
        raise ConfigMismatch(
            f"{variant}: encoder_dims={encoder_dims} but embed_dim={embed_dim}; Point-MAE's group tokens enter the "
            f"transformer as they are, so the two must be equal: set encoder_dims={embed_dim} or leave it unset "
            "(or use variant point_bert, whose reduce_dim maps the tokens to embed_dim)"
        )
    return embed_dim


def _check_grouping(num_group: int, group_size: int, num_points: int) -> None:
    """FPS picks `num_group` centres of the cloud and each takes its `group_size` nearest points: neither can
    exceed the cloud's `num_points`."""
    if not 1 <= num_group <= num_points or not 1 <= group_size <= num_points:
        raise ConfigMismatch(
            f"num_group={num_group} centres of group_size={group_size} points each need clouds of at least "
            f"{max(num_group, group_size)} points, and num_points={num_points}; lower num_group / group_size or "
            "raise num_points (Point-MAE: 1024 points in 64 groups of 32; ScanObjectNN: 2048 in 128 x 32)"
        )


class PointTransformer(TokenBackbone):
    """Point-MAE / Point-BERT transformer on [B, N, 3] clouds (xyz only).

    Args:
        variant: "point_mae" (mini-PointNet to 384) or "point_bert" (to 256, then `reduce_dim` to 384).
        weights: an official checkpoint (a Point-MAE pretrain / fine-tune file, a Point-BERT one) or a
            state dict of this backbone (.safetensors / .pth); see `load_point_checkpoint`.
        load_head: a fine-tuned file's classification head (`cls_head_finetune.*`, the layout of
            `default_head`) goes to the task head (`checkpoint_head`), so testing the file scores its own head;
            False ignores it (a fresh head on the fine-tuned backbone).
        num_group, group_size: G centres and k neighbours (64 x 32 for 1,024 points; ScanObjectNN with
            Point-MAE: 128 x 32 for 2,048 points).
        depth, embed_dim, num_heads, mlp_ratio: the transformer (12 x 384, 6 heads, ratio 4).
        encoder_dims, pointnet_widths: the mini-PointNet's output and inner widths (128, 256, 512); other values
            make small models, e.g. the shapes quickstart's. Point-BERT's tokens are 256-d (`reduce_dim` maps them
            to `embed_dim`); Point-MAE's tokens enter the transformer as they are, so its `encoder_dims` is
            `embed_dim` (unset: follows it; another value is refused).
        drop_path_rate: stochastic depth rising linearly from 0 to this over the blocks (0.1 in the
            fine-tuning recipes).
        fps_start: "first": FPS starts at index 0 of the given order, as pointnet2_ops (randomness comes
            from shuffling the points); "random": in training, each cloud's start is drawn from the
            forward context's seeded generator (evaluation still starts at index 0, so it is deterministic).
        num_points: the clouds' size: example inputs, and the grouping must fit it (the task also checks the
            data's clouds against the grouping when model and data meet).
        device: build on this device ("meta" for counts).
    """

    pos_every_block = True
    in_channels = 3  # xyz only: the grouping and the mini-PointNet see coordinates

    def __init__(
        self,
        variant: str = "point_mae",
        weights: str | os.PathLike | None = None,
        num_group: int = 64,
        group_size: int = 32,
        depth: int = 12,
        embed_dim: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        encoder_dims: int | None = None,
        pointnet_widths: tuple[int, int, int] = (128, 256, 512),
        fps_start: str = "first",
        num_points: int = 1024,
        device: str | torch.device | None = None,
        load_head: bool = True,
    ):
        super().__init__()
        if variant not in POINT_VARIANTS:
            raise UnknownName(f"unknown point transformer variant {variant!r}; variants: {', '.join(POINT_VARIANTS)}")
        if fps_start not in FPS_STARTS:
            raise ValueError(f"fps_start must be one of {FPS_STARTS}, got {fps_start!r}")
        spec = POINT_VARIANTS[variant]
        encoder_dims = _encoder_width(variant, embed_dim, encoder_dims)
        _check_grouping(num_group, group_size, num_points)
        if embed_dim % num_heads:
            raise ConfigMismatch(f"embed_dim={embed_dim} does not split into num_heads={num_heads} heads; choose a "
                                 "num_heads that divides embed_dim (Point-MAE: 384 and 6)")  # fmt: skip
        self.name, self.variant = variant, variant
        self.embed_dim, self.num_heads, self.pool_type = embed_dim, num_heads, "cls+max"
        self.num_group, self.group_size, self.fps_start, self.num_points = num_group, group_size, fps_start, num_points
        self.default_head = dict(POINT_HEADS[variant])
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.encoder = MiniPointNet(encoder_dims, tuple(pointnet_widths))
            self.reduce_dim = nn.Linear(encoder_dims, embed_dim) if spec["reduce_dim"] else None
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
            self.blocks = nn.ModuleList(_block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
            self.norm = nn.LayerNorm(embed_dim)
        if self.cls_token.device.type != "meta":
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # both 1x1xC, trunc-normal std 0.02, as Point-MAE's
            nn.init.trunc_normal_(self.cls_pos, std=0.02)
        self.init_sites()
        weights = optional_path(weights)
        if weights is not None:
            self.load_report = load_point_checkpoint(self, weights, load_head)
        record_weights(self, weights)

    def embed(self, xyz: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if xyz.dim() != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"{self.name} takes [B, N, 3] point clouds (xyz), got shape {tuple(xyz.shape)}")
        b, n, _ = xyz.shape
        start: int | torch.Tensor = 0
        if self.fps_start == "random" and ctx.training:
            # drawn and range-checked on the CPU (mmpeft.ops.point moves it): no device sync per step
            start = ctx.draw("fps_start", lambda g: torch.randint(0, n, (b,), generator=g))
        from mmpeft.ops.point import group

        neighbourhood, centres = group(xyz, self.num_group, self.group_size, start)
        tokens = self.encoder(neighbourhood)
        if self.reduce_dim is not None:
            tokens = self.reduce_dim(tokens)
        pos = self.pos_embed(centres)
        ctx.xyz, ctx.centres = xyz, centres
        ctx.positions = torch.cat([self.cls_pos.expand(b, -1, -1), pos], dim=1)
        ctx.token_meta["centres"] = torch.cat([centres.new_zeros(b, 1, 3), centres], dim=1)
        ctx.layout.update(cls=slice(0, 1), patches=slice(1, 1 + self.num_group))
        return torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)

    @torch.no_grad()
    def query_features(self, xyz: torch.Tensor, num_group: int | None = None,
                       group_size: int | None = None) -> torch.Tensor:  # fmt: skip
        """The backbone in its pretraining form, as Point-PEFT's memory bank and query read it: its own grouping
        (`num_group` x `group_size`, default the backbone's), no cls token, every block with the positions re-added,
        the final norm, and the max over the tokens: [B, embed_dim]. It runs through `disabled()`: the pristine
        pretrained encoder whatever a method attaches or trains in place, without a second copy of the weights."""
        from mmpeft.core.pristine import disabled
        from mmpeft.ops.point import group

        g, k = num_group or self.num_group, group_size or self.group_size
        _check_grouping(g, k, xyz.shape[1])
        with disabled(self):
            neighbourhood, centres = group(xyz, g, k)
            tokens = self.encoder(neighbourhood)
            x = self.reduce_dim(tokens) if self.reduce_dim is not None else tokens
            pos = self.pos_embed(centres)
            ctx = ForwardContext(training=False, xyz=xyz, centres=centres, positions=pos)
            ctx.layout["patches"] = slice(0, g)
            ctx.token_meta["centres"] = centres
            with self.context_slot.active(ctx):
                for block in self.blocks:
                    x = block(x + pos, ctx)
                return self.norm(x).max(dim=1).values

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, self.num_points, 3, generator=generator)

    def input_layer(self) -> str:
        return "encoder.first_conv.0"


# -- official checkpoints ------------------------------------------------------------------------------------
_ENCODER_PREFIXES = {
    # Point-MAE pretraining stores the encoder as `MAE_encoder.`; fine-tuned files have no prefix
    "point_mae": ("MAE_encoder.", "base_model."),
    # Point-BERT pretraining (MoCo-style) keeps the transformer as `transformer_q.` beside a momentum copy
    "point_bert": ("transformer_q.", "base_model."),
}
_HEAD_PREFIXES = ("cls_head_finetune.", "cls_head.", "head.")
_FINETUNED_HEAD = "cls_head_finetune."  # the official fine-tuning models' head (Point-MAE, Point-BERT)


def _official_to_own(key: str) -> str:
    return "blocks." + key[len("blocks.blocks.") :] if key.startswith("blocks.blocks.") else key


def official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone state dict (e.g. of `merge_and_unload()`) in the official key layout (`blocks.blocks.<i>`),
    which the official code's `load_model_from_ckpt` reads."""
    return {("blocks." + k if k.startswith("blocks.") else k): v for k, v in state.items()}


def load_point_checkpoint(backbone: PointTransformer, path: str, load_head: bool = True) -> dict[str, list[str]]:
    """Load an official Point-MAE / Point-BERT checkpoint (or one of this backbone's own state dicts).

    Official files hold `{"base_model": state, ...}` (read with `weights_only=True`). The encoder's prefix
    is stripped (`module.` from DataParallel; Point-MAE `MAE_encoder.`, Point-BERT `transformer_q.`), the
    `blocks.blocks.<i>` level is mapped to `blocks.<i>`, and the rest (the MAE decoder, BERT's momentum
    encoder, dVAE and pretraining heads) is ignored. A pretraining file has no cls token / cls_pos (Point-MAE)
    and no head: those stay fresh and are reported. A fine-tuned file's `cls_head_finetune.*` (with `load_head`)
    is kept as the backbone's `checkpoint_head` when it has the layout of `default_head` (the official models'
    heads do), for `PeftModel` to load into the task head. Every block, the mini-PointNet and the position MLP
    must be there with the right shapes, or nothing is loaded and the error says what is wrong.
    Returns {"loaded", "fresh", "ignored", "head"} key lists (also printed as one line)."""
    raw = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    prefixes = _ENCODER_PREFIXES[backbone.variant]
    state: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    has_prefixed = any(k.startswith(prefixes[0]) for k in raw)
    for key, value in raw.items():
        own = key
        if has_prefixed:
            if not key.startswith(prefixes[0]):
                ignored.append(key)
                continue
            own = key[len(prefixes[0]) :]
        own = _official_to_own(own.removeprefix(prefixes[1]))
        if own.startswith(_FINETUNED_HEAD) and not has_prefixed and load_head:  # a fine-tuned model's own head
            head[own[len(_FINETUNED_HEAD) :]] = value
            continue
        if own.startswith(_HEAD_PREFIXES):
            ignored.append(key)
            continue
        state[own] = value
    own_state = backbone.state_dict()
    ignored += [k for k in state if k not in own_state]
    state = {k: v for k, v in state.items() if k in own_state}
    fresh = sorted(own_state.keys() - state.keys())
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own_state[k].shape)}" for k, v in state.items()
             if v.shape != own_state[k].shape]  # fmt: skip
    required = [k for k in fresh if k not in ("cls_token", "cls_pos")]
    if wrong or required:
        raise WeightsUnavailable(
            f"{str(path)!r} does not fit {backbone.variant} (depth {backbone.depth}, width {backbone.embed_dim}): "
            f"{len(required)} backbone tensors missing (e.g. {required[:3]}), {len(wrong)} with another shape "
            f"{wrong[:3]}. Is it a {backbone.variant} checkpoint? Point-BERT files need variant='point_bert'."
        )
    backbone.load_state_dict(state, strict=False)
    found = read_checkpoint_head(backbone.default_head, head, backbone.num_features, path) if head else None
    backbone.checkpoint_head = found
    if head and found is None:
        ignored += [_FINETUNED_HEAD + k for k in head]
        print(f"{backbone.variant}: the head in {path} ({len(head)} tensors) does not have the layout of the default "
              f"head {backbone.default_head}; it is not loaded (the task head starts fresh)")  # fmt: skip
    taken = (
        f"the file's head ({found.spec['num_classes']} classes) goes to the task head"
        if found
        else "the task head starts fresh"
    )
    print(f"{backbone.variant}: loaded {len(state)} tensors from {path}; fresh: {fresh or 'none'}; {taken}; "
          f"ignored {len(ignored)} (decoder / momentum encoder / pretraining heads)")  # fmt: skip
    return {"loaded": sorted(state), "fresh": fresh, "ignored": sorted(ignored),
            "head": sorted(_FINETUNED_HEAD + k for k in (found.state if found else {}))}  # fmt: skip


@register_backbone(
    "point_mae", family=PointTransformer.family, description="Point-MAE's transformer (21,825,792 parameters)"
)
def point_mae(**kwargs: Any) -> PointTransformer:
    return PointTransformer("point_mae", **kwargs)


@register_backbone(
    "point_bert", family=PointTransformer.family, description="Point-BERT's transformer (21,858,816 parameters)"
)
def point_bert(**kwargs: Any) -> PointTransformer:
    return PointTransformer("point_bert", **kwargs)
