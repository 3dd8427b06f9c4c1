"""Bottleneck adapters: AdaptFormer's parallel adapter (Chen et al., "AdaptFormer: Adapting Vision
Transformers for Scalable Visual Recognition", NeurIPS 2022) and the sequential (Pfeiffer) form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import Bottleneck

__all__ = ["Adapter", "SiteAdapter"]


class SiteAdapter(Bottleneck):
    """A bottleneck hooked on a block site: parallel (`m + f(x_in)`) or sequential (`m + f(m)`)."""

    def __init__(self, dim: int, hidden: int, parallel: bool, **kwargs):
        super().__init__(dim, hidden, **kwargs)
        self.parallel = parallel

    def forward(self, m: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor | None = None,
                branch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return m + super().forward(x_in if self.parallel else m)


@register_method
@dataclass
class Adapter(Method):
    """AdaptFormer: beside every block's MLP, `s * up(act(down(x)))` reads the block's residual
    stream (the MLP norm's input) and is added after the MLP branch's LayerScale and drop-path, as
    the official code adds it (ShoufaChen/AdaptFormer `models/custom_modules.py`, `Block.forward`:
    `x = residual + drop_path(mlp(norm2(x))) + adapt_x`, so the adapter is not dropped with the MLP).
    Down is kaiming-uniform and up is zero, so the model is the frozen backbone at step 0 (both-zero
    inits, VPT's bug, are refused). Not mergeable: the activation sits between the projections.

    `position="sequential"` gives the Pfeiffer form on the MLP output (inside LayerScale and
    drop-path) instead. `norm=True` adds the adapter's own LayerNorm (MoSA's baseline). The default
    bottleneck 8 is the VTAB-1k convention (NOAH, V-PETL: 156,768 trainable on ViT-B/16); the `paper`
    preset is AdaptFormer's image recipe (`main_image.py`: bottleneck 64, ReLU, scale 0.1, dropout 0.1,
    head trunc_normal(0.01) as MoCo v3). Not copied: AdaptFormer's image runs put a BatchNorm without
    affine before the head (an MAE linear-probing convention, not part of the method) and keep the
    head bias at PyTorch's default (mmpeft zeroes it with the init).
    """

    name: ClassVar[str] = "adapter"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    needs_tokens: ClassVar[bool] = True
    presets: ClassVar[dict] = {
        "paper": {
            "bottleneck": 64,
            "scale": 0.1,
            "dropout": 0.1,
            "activation": "relu",
            "norm": False,
            "head_init": "trunc_normal:0.01",
        }
    }

    bottleneck: int = field(
        default=8,
        metadata={"help": "hidden width of the adapter (8: the VTAB-1k convention; the paper preset uses 64)"},
    )
    scale: float = field(
        default=0.1, metadata={"help": "multiplier s on the adapter's output before it is added to the MLP output"}
    )
    dropout: float = field(
        default=0.1, metadata={"help": "dropout between the activation and the up projection (training only)"}
    )
    activation: str = field(
        default="relu",
        metadata={"help": "nonlinearity between the projections: relu, gelu, silu, quick_gelu or identity"},
    )
    norm: bool = field(
        default=False, metadata={"help": "give the adapter its own LayerNorm on its input (MoSA's baseline)"}
    )
    position: str = field(
        default="parallel",
        metadata={
            "help": (
                '"parallel" (AdaptFormer: reads the MLP norm\'s input) or "sequential" (Pfeiffer: reads the '
                "MLP output); either way it is added to the MLP output"
            )
        },
    )  # or "sequential"

    def __post_init__(self) -> None:
        if self.position not in ("parallel", "sequential"):
            raise ValueError(f"adapter position must be 'parallel' or 'sequential', got {self.position!r}")

    def inject(self, backbone: nn.Module) -> None:
        assert isinstance(backbone, TokenBackbone)
        for _, site in backbone.sites("mlp.parallel" if self.position == "parallel" else "mlp.branch"):
            ref = backbone.blocks[0].norm2.weight if hasattr(backbone.blocks[0].norm2, "weight") else None
            site.append(
                SiteAdapter(
                    backbone.embed_dim,
                    self.bottleneck,
                    parallel=self.position == "parallel",
                    activation=self.activation,
                    scale=self.scale,
                    dropout=self.dropout,
                    norm=self.norm,
                    device=ref.device if ref is not None else None,
                )
            )
