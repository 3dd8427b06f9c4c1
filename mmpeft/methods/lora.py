"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.fused import add_low_rank_to_parts, parse_fused_target, parts_delta_weight
from mmpeft.core.inject import attach
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, LowRank
from mmpeft.core.targets import LINEAR_TARGETS_HELP, select_modules

__all__ = ["LoRA", "LoRADelta", "parse_target", "DEFAULT_TARGETS"]


# Default targets per backbone family. Denoisers: the attention projections, as diffusers'
# DreamBooth LoRA script (plus the added key / value projections of models that have them).
DENOISER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
DEFAULT_TARGETS = {"token": ("attn.qkv[q,v]",), "unet": DENOISER_TARGETS, "dit": DENOISER_TARGETS}


def parse_target(target: str) -> tuple[str, tuple[str, ...]]:
    """`"attn.qkv[q,v]"` -> ("attn.qkv", ("q", "v")): a low-rank delta on the q and v thirds of a
    fused qkv linear (`mmpeft.core.fused`)."""
    return parse_fused_target(target, "LoRA")


@torch.no_grad()
def _trunc_normal_init(delta: LowRank) -> None:
    """A and B ~ trunc_normal(0.02): what NOAH's released runs start from (its ViT's `init_weights` re-inits
    every Linear after LoRA_a / LoRA_b were built kaiming / zero), so the delta is not zero at step 0."""
    if delta.A.device.type == "meta":
        return
    for tensor in (delta.A, delta.B):
        nn.init.trunc_normal_(tensor, std=0.02)


class LoRADelta(AdapterModule):
    """Low-rank deltas on a Linear's or Conv2d's whole output, or on named thirds of a fused qkv output."""

    def __init__(self, layer: nn.Module, parts: tuple[str, ...], r: int, alpha: float | None, dropout: float,
                 init: str = "kaiming"):  # fmt: skip
        super().__init__()
        self.parts = parts
        if parts:
            width = layer.out_features // 3
            kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
            self.deltas = nn.ModuleDict({p: LowRank(layer.in_features, width, r, alpha, dropout, **kw) for p in parts})
        else:
            self.deltas = nn.ModuleDict({"all": LowRank.for_layer(layer, r, alpha, dropout)})
        if init == "trunc_normal":
            for delta in self.deltas.values():
                _trunc_normal_init(delta)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return self.deltas["all"].add_to(y, x)
        return add_low_rank_to_parts(y, self.deltas, x)

    def _delta_weight(self, host: nn.Module) -> torch.Tensor:
        if not self.parts:
            return self.deltas["all"].delta_weight().float()
        return parts_delta_weight(host, {p: d.delta_weight for p, d in self.deltas.items()}, torch.float32)

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": (host.weight.float() + self._delta_weight(host)).to(host.weight.dtype)}

    def unmerge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": (host.weight.float() - self._delta_weight(host)).to(host.weight.dtype)}


@register_method
@dataclass
class LoRA(Method):
    """LoRA: `W x + (alpha / r) B A x` on the targeted linears and convolutions; A kaiming-uniform,
    B zero. On a Conv2d, A is a k×k convolution and B a 1×1 one (as peft), so UNet ResNet convs work.

    Targets are module-name patterns with globs (`"attn.qkv"`, `"blocks.[0-5].mlp.fc1"`,
    `"*resnets.*.conv2"`); a fused qkv can take a trailing `[q,v]` to adapt only those thirds. Each
    pattern must match a module. Unset, the backbone family's default applies: ViT-style token
    backbones `attn.qkv[q,v]`; UNets and DiTs `to_q, to_k, to_v, to_out.0` (plus `add_k_proj,
    add_v_proj` where present), as diffusers' DreamBooth LoRA. Merge folds `(alpha / r) B A` into the
    weight; unmerge subtracts it again.

    The default keeps separate q and v pairs with peft's init (A kaiming-uniform, B zero). The
    `paper` preset is NOAH's VTAB baseline ("LoRA-8"; Zhang et al., "Neural Prompt Search", 2022; code
    ZhangYuanhan-AI/NOAH, `model/supernet_vision_transformer_timm.py`, `Attention`): one rank-8 pair on
    the whole fused qkv output (one A shared by q, k and v; B is 2304 x 8), no alpha/r scaling, dropout
    0.1 on the pair's input (`--drop_rate_LoRA`): 3,072·r = 294,912 trainable on ViT-B/16 — the same
    count as the default's q and v pairs, a different function. Official bug, fixed: NOAH builds A
    kaiming-uniform and B zero, then its ViT's `init_weights` (`_init_vit_weights`) re-initialises every
    Linear, LoRA_a and LoRA_b included, to trunc_normal(0.02), so its released runs start from a random
    non-zero delta; the preset keeps the intended init (the identity at step 0). `init="trunc_normal"`
    reproduces the released runs' start. `b_lr_ratio` > 1 is LoRA+
    (Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024): B in its own
    optimizer group at that multiple of the learning rate.
    """

    name: ClassVar[str] = "lora"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {
        "paper": {
            "r": 8,
            "alpha": None,
            "dropout": 0.1,
            "targets": ("attn.qkv",),
            "init": "kaiming",
            "head_init": "trunc_normal:0.02",
        },
    }

    r: int = field(default=8, metadata={"help": "rank r of the update B A"})
    alpha: float | None = field(
        default=None, metadata={"help": "the update is scaled by alpha / r; unset: scale 1 (alpha = r)"}
    )  # None: scale 1 (alpha = r)
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the input of the low-rank branch (training only)"}
    )
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": LINEAR_TARGETS_HELP},
    )  # None: the backbone family's default (see the docstring)
    b_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "LoRA+: B trains at this multiple of the run's learning rate (A at the run's own); 1: plain LoRA"
        },
    )
    init: str = field(
        default="kaiming",
        metadata={
            "help": (
                "kaiming: A kaiming-uniform, B zero (the identity at step 0); trunc_normal: A and B ~ N(0, 0.02) "
                "truncated, as NOAH's released runs start (not the identity)"
            )
        },
    )

    def __post_init__(self) -> None:
        if self.init not in ("kaiming", "trunc_normal"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'trunc_normal', got {self.init!r}")

    def param_groups(self, named: dict[str, nn.Parameter]) -> list[dict]:
        """LoRA+ (Hayou et al., ICML 2024): the B matrices in their own group at `b_lr_ratio` x the lr."""
        if self.b_lr_ratio == 1.0:
            return []
        b_names = [n for n in named if n.endswith(".B") and ".lora." in n]
        return [{"name": "lora_B", "params": b_names, "lr_scale": self.b_lr_ratio}]

    def inject(self, backbone: nn.Module) -> None:
        pattern_of = lambda target: parse_target(target)[0]
        for target, name, module in select_modules(backbone, "LoRA", self.targets, DEFAULT_TARGETS, pattern_of):
            parts = parse_target(target)[1]
            if not isinstance(module, nn.Linear | nn.Conv2d):
                raise NotSupported(
                    f"LoRA target {name!r} is a {type(module).__name__}; LoRA supports nn.Linear and nn.Conv2d"
                )
            if parts and not (isinstance(module, nn.Linear) and module.out_features % 3 == 0):
                raise NotSupported(f"LoRA parts {parts} need a fused qkv linear; {name!r} is not one")
            attach(module, "lora", LoRADelta(module, parts, self.r, self.alpha, self.dropout, self.init))
