"""Baselines without modules of their own: linear probe, full fine-tuning, BitFit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mmpeft.core.method import Method, register_method

__all__ = ["LinearProbe", "FullFinetune", "BitFit"]


@register_method
@dataclass
class LinearProbe(Method):
    """Only the task head trains; the frozen backbone runs in eval mode (as VPT's linear runs do).

    Merge is a no-op: the backbone is untouched.
    """

    name: ClassVar[str] = "linear"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    frozen_mode: ClassVar[str] = "eval"
    presets: ClassVar[dict] = {"paper": {}}


@register_method
@dataclass
class FullFinetune(Method):
    """Every backbone tensor trains (the upper baseline). Backbone dropout/drop-path stay active
    in training and BatchNorm statistics update, as in ordinary fine-tuning. Merge is a no-op.
    """

    name: ClassVar[str] = "full"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {}}

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        return [n for n, _ in backbone.named_parameters()]


@register_method
@dataclass
class BitFit(Method):
    """BitFit (Ben Zaken et al., ACL 2022): every bias trains, LayerNorm and patch-embedding
    biases included, as in VPT's and V-PETL's "bias" baseline (102,912 on ViT-B/16).
    Frozen BatchNorm statistics stay fixed. Merge is a no-op: the biases are the backbone's own.
    """

    name: ClassVar[str] = "bitfit"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {}}

    def unfrozen(self, backbone: nn.Module) -> list[str]:
        return [n for n, _ in backbone.named_parameters() if "bias" in n.rsplit(".", 1)[-1]]
