"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import attach, find_modules
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, LowRank

__all__ = ["LoRA", "LoRADelta", "parse_target"]

_PARTS = "qkv"
_TARGET = re.compile(r"^(?P<pattern>[^\[\]]+)(\[(?P<parts>[qkv](,[qkv])*)\])?$")


def parse_target(target: str) -> tuple[str, tuple[str, ...]]:
    """`"attn.qkv[q,v]"` -> ("attn.qkv", ("q", "v")): a low-rank delta on the q and v thirds of a
    fused qkv linear. Without brackets the delta covers the whole output."""
    m = _TARGET.match(target.replace(" ", ""))
    if not m:
        raise ValueError(f"bad LoRA target {target!r}; use a module name pattern, optionally with [q,k,v] parts")
    parts = tuple(m["parts"].split(",")) if m["parts"] else ()
    return m["pattern"], parts


class LoRADelta(AdapterModule):
    """Low-rank deltas on a Linear's whole output, or on named thirds of a fused qkv output."""

    def __init__(self, linear: nn.Linear, parts: tuple[str, ...], r: int, alpha: float | None, dropout: float):
        super().__init__()
        self.parts = parts
        width = linear.out_features // 3 if parts else linear.out_features
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.deltas = nn.ModuleDict(
            {p: LowRank(linear.in_features, width, r, alpha, dropout, **kw) for p in (parts or ("all",))}
        )

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return y + self.deltas["all"](x)
        chunks = list(y.chunk(3, dim=-1))
        for p, delta in self.deltas.items():
            i = _PARTS.index(p)
            chunks[i] = chunks[i] + delta(x)
        return torch.cat(chunks, dim=-1)

    def _delta_weight(self, host: nn.Linear) -> torch.Tensor:
        if not self.parts:
            return self.deltas["all"].delta_weight()
        full = torch.zeros_like(host.weight)
        width = host.out_features // 3
        for p, delta in self.deltas.items():
            i = _PARTS.index(p)
            full[i * width : (i + 1) * width] = delta.delta_weight()
        return full

    @torch.no_grad()
    def merge_into(self, host: nn.Linear) -> None:
        host.weight.add_(self._delta_weight(host).to(host.weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: nn.Linear) -> None:
        host.weight.sub_(self._delta_weight(host).to(host.weight.dtype))


@register_method
@dataclass
class LoRA(Method):
    """LoRA: `W x + (alpha / r) B A x` on the targeted linears; A kaiming-uniform, B zero.

    Targets are module-name patterns (`"attn.qkv"`, `"blocks.*.mlp.fc1"`); a fused qkv can take
    `[q,v]` to adapt only those thirds. Works on any backbone with `nn.Linear`s. Merge folds
    `(alpha / r) B A` into the weight; unmerge subtracts it again.

    The `paper` preset is NOAH's VTAB baseline ("LoRA-8"): rank 8 on q and v of the fused qkv, no
    alpha/r scaling (scale 1), no dropout: 294,912 trainable on ViT-B/16. It is also the default.
    """

    name: ClassVar[str] = "lora"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"r": 8, "alpha": None, "dropout": 0.0, "targets": ("attn.qkv[q,v]",)}}

    r: int = 8
    alpha: float | None = None  # None: scale 1 (alpha = r)
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=lambda: ("attn.qkv[q,v]",))

    def inject(self, backbone: nn.Module) -> None:
        for target in self.targets:
            pattern, parts = parse_target(target)
            for name, module in find_modules(backbone, [pattern]):
                if not isinstance(module, nn.Linear):
                    raise NotSupported(f"LoRA target {name!r} is a {type(module).__name__}; LoRA supports nn.Linear")
                if parts and module.out_features % 3:
                    raise NotSupported(f"LoRA parts {parts} need a fused qkv linear; {name!r} is not one")
                attach(module, "lora", LoRADelta(module, parts, self.r, self.alpha, self.dropout))
