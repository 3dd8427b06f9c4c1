"""Baselines without modules of their own: linear probe, full fine-tuning, BitFit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.heads import VPT_HEAD
from mmpeft.core.inject import close_names, match_name
from mmpeft.core.method import Method, register_method

__all__ = ["LinearProbe", "FullFinetune", "BitFit"]


@register_method
@dataclass
class LinearProbe(Method):
    """Only the task head trains; the frozen backbone runs in eval mode (as VPT's linear runs do).

    Merge is a no-op: the backbone is untouched. Refused on backbones without pooled features
    (denoisers), where there is no head to train.
    """

    name: ClassVar[str] = "linear"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    frozen_mode: ClassVar[str] = "eval"
    presets: ClassVar[dict] = {"paper": {"head_init": VPT_HEAD}}

    def inject(self, backbone: nn.Module) -> None:
        if not getattr(backbone, "num_features", 1):
            raise NotSupported(
                f"no pooled features for a head: the linear probe trains only a task head, and "
                f"{type(backbone).__name__} {getattr(backbone, 'name', '')!r} has num_features = 0"
            )


@register_method
@dataclass
class FullFinetune(Method):
    """Every backbone tensor trains (the upper baseline). Backbone dropout/drop-path stay active
    in training and BatchNorm statistics update, as in ordinary fine-tuning. Merge is a no-op.
    No step-0 copy of the backbone is kept, so `disabled()` and `unload()` refuse.
    """

    name: ClassVar[str] = "full"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    trains_backbone: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"head_init": VPT_HEAD}}

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        return [n for n, _ in backbone.named_parameters()]


@register_method
@dataclass
class BitFit(Method):
    """BitFit (Ben Zaken et al., ACL 2022): every bias trains, LayerNorm and patch-embedding
    biases included, as in VPT's and V-PETL's "bias" baseline (102,912 on ViT-B/16); on any
    backbone family (UNet, DiT, convnets) the default is likewise every bias.
    Frozen BatchNorm statistics stay fixed. Merge is a no-op: the biases are the backbone's own.
    Their step-0 values are kept (KBs), so `disabled()` still runs the pristine backbone.
    Necessary cost: a bias's gradient is the sum of its output's gradient, so nothing is kept for it; a frozen
    convolution's trained bias is added after the convolution (`core.conv_bias`), since on CPU oneDNN computes
    the whole weight gradient whenever a convolution's bias gradient is asked for.

    `targets` narrows the set to bias parameters whose names match these patterns (each must match
    at least one bias), e.g. `["*attn*"]`.
    """

    name: ClassVar[str] = "bitfit"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"head_init": VPT_HEAD}}

    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": (
                'bias-name patterns (globs) narrowing the trained biases, each must match one, e.g. ["*attn*"]; '
                "unset: every bias"
            )
        },
    )  # None: every bias

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        biases = [n for n, _ in backbone.named_parameters() if "bias" in n.rsplit(".", 1)[-1]]
        if self.targets is None:
            return biases
        for pattern in self.targets:
            if not any(match_name(n, pattern) for n in biases):
                close = close_names(pattern, biases)
                hint = f"; close names: {', '.join(close)}" if close else ""
                raise NotSupported(f"BitFit target pattern {pattern!r} matches no bias parameter{hint}")
        return [n for n in biases if any(match_name(n, p) for p in self.targets)]
