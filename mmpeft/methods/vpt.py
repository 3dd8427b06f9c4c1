"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022; code KMnP/vpt)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.heads import VPT_HEAD
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, PromptTokens, context_dropout_mask

__all__ = ["VPT", "PromptInsertion"]


class PromptInsertion(AdapterModule):
    """Hook on `before_block[i]`: block 0 inserts the prompts, deep mode replaces them later."""

    def __init__(self, prompts: PromptTokens, depth_index: int, dropout: float):
        super().__init__()
        self.depth_index, self.dropout = depth_index, dropout
        # block 0 owns the prompt tensor; deeper hooks share it without registering it twice
        if depth_index == 0:
            self.prompts = prompts
        else:
            object.__setattr__(self, "_shared", prompts)

    @property
    def tokens(self) -> PromptTokens:
        return self.prompts if self.depth_index == 0 else self._shared

    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        prompts = self.tokens(self.depth_index, x.shape[0])
        if self.training and self.dropout > 0:
            prompts = prompts * context_dropout_mask(ctx, f"vpt.dropout.{index}", prompts.shape, self.dropout, prompts)
        if self.depth_index == 0:
            return ctx.insert(x, prompts, "prompts", ctx.prompt_index)
        return ctx.replace(x, "prompts", prompts)


@register_method
@dataclass
class VPT(Method):
    """VPT-shallow / VPT-deep: `length` learnable tokens spliced between CLS (and registers) and the
    patches after the position embedding (prompts get none). Deep mode overwrites them with a fresh
    set before every later block. Trainable: D·p (shallow) or depth·D·p (deep); 9,216·p on ViT-B/16.

    Init: uniform on ±sqrt(6 / (fan_in + D)), Xavier over the patch projection as in the official
    code (fan_in = 3·16·16 on ViT-B/16, so the bound is exactly 0.0625). Prompt dropout masks are
    drawn through the forward context. The frozen backbone runs in eval mode (VPT overrides
    `train()` the same way), so its own dropout is off. Not mergeable: prompts are extra tokens.
    Pooling is unaffected: the CLS token stays at index 0 and "patches" stays the patch group.

    Presets: `paper` is VPT-deep with prompt dropout 0.1 (the released demo runs); `paper_shallow`
    is VPT-shallow without dropout; both decay the prompts as VPT's SGD does (mmpeft's default
    exempts prompts from weight decay, as for every other method) and initialise the head as VPT's
    `MLP(..., special_bias=True)` (KMnP/vpt `src/models/mlp.py` L53-57: kaiming-normal fan_out, bias
    -log(99)); mmpeft's default keeps PyTorch's head init. The per-task prompt length is a
    config value (see configs/vtab).
    """

    name: ClassVar[str] = "vpt"
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    frozen_mode: ClassVar[str] = "eval"
    presets: ClassVar[dict] = {
        "paper": {"deep": True, "dropout": 0.1, "decay_prompts": True, "head_init": VPT_HEAD},
        "paper_shallow": {"deep": False, "dropout": 0.0, "decay_prompts": True, "head_init": VPT_HEAD},
    }

    length: int = field(default=10, metadata={"help": "number p of prompt tokens (per block in deep mode)"})
    deep: bool = field(
        default=False,
        metadata={"help": "VPT-deep: a fresh set of prompts before every block; false: VPT-shallow, inserted once"},
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the prompt tokens in training, in [0, 1)"})
    init_bound: float | None = field(
        default=None,
        metadata={
            "help": (
                "prompts init uniform on +-init_bound; unset: sqrt(6 / (fan_in + D)), Xavier over the "
                "patch projection (0.0625 on ViT-B/16)"
            )
        },
    )
    decay_prompts: bool = field(
        default=False,
        metadata={"help": "weight-decay the prompts as VPT's SGD does; false: exempt them, as mmpeft does by default"},
    )  # VPT's SGD decays the prompts too; mmpeft's default exempts them

    def weight_decay_exempt(self, name: str, param: torch.Tensor) -> bool:
        if self.decay_prompts and "prompt" in name:
            return False
        return super().weight_decay_exempt(name, param)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"VPT needs at least one prompt token, got length={self.length}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"prompt dropout must be in [0, 1), got {self.dropout}")

    def bound(self, backbone: TokenBackbone) -> float:
        if self.init_bound is not None:
            return self.init_bound
        fan_in = backbone.prompt_fan_in() or backbone.embed_dim
        return math.sqrt(6.0 / (fan_in + backbone.embed_dim))

    def inject(self, backbone: nn.Module) -> None:
        assert isinstance(backbone, TokenBackbone)
        depth = backbone.depth if self.deep else 1
        device = next(backbone.parameters()).device
        prompts = PromptTokens(self.length, backbone.embed_dim, depth, self.bound(backbone), device=device)
        for i in range(depth):
            backbone.before_block[i].append(PromptInsertion(prompts, i, self.dropout))
