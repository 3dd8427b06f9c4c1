"""SSF: Scaling & Shifting Your Features (Lian et al., NeurIPS 2022; code dongzelian/SSF)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import attach, find_modules
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import ScaleShift

__all__ = ["SSF", "VIT_POSITIONS"]

# The 8 positions of the official ViT code: after the patch projection, 6 per block, after the final norm.
VIT_POSITIONS = ("patch_embed.proj", "norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "norm")
_FOLDABLE = (nn.Linear, _ConvNd, nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def _width_and_channel_dim(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, _ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], -1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, _BatchNorm):
        return module.num_features, 1
    raise NotSupported(f"SSF cannot scale the output of {type(module).__name__}")


class SSFScaleShift(ScaleShift):
    """A scale-shift attached to a layer's output; merges by folding into that layer."""

    def merge_into(self, host: nn.Module) -> None:
        self._saved = (host.weight.detach().clone(), host.bias.detach().clone())
        self.fold_into(host)

    @torch.no_grad()
    def unmerge_from(self, host: nn.Module) -> None:
        weight, bias = self._saved
        host.weight.copy_(weight)
        host.bias.copy_(bias)
        del self._saved


@register_method
@dataclass
class SSF(Method):
    """SSF: `y * gamma + beta` per channel after each targeted layer. On a ViT the official 8
    positions: the patch projection, in every block after norm1, qkv (2304 wide, before the head
    split), proj, norm2, fc1 (before GELU) and fc2, and after the final norm: 205,824 trainable on
    ViT-B/16. Convolutions and BatchNorms are scaled on channel dim 1, so SSF also runs on
    convnets with conv/BN name patterns.

    Init gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as released, so the model is *not* the backbone at
    step 0. gamma and beta take no weight decay (1-D). The frozen backbone stays in train mode so
    the recipe's drop-path is active. Merge folds every factor into the layer it follows
    (W' = diag(gamma) W, b' = gamma b + beta; LayerNorm affine likewise): the merged model has
    exactly the backbone's keys and shapes (a layer without bias, e.g. a bias-free qkv, makes
    `merge` refuse, since folding the shift would need a new tensor) and loads into plain timm (the paper describes this
    re-parameterisation; the official repo ships no merge code, SSF issue #19).
    """

    name: ClassVar[str] = "ssf"
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"init": "normal", "std": 0.02, "targets": VIT_POSITIONS}}

    targets: tuple[str, ...] = field(default_factory=lambda: VIT_POSITIONS)
    init: str = "normal"
    std: float = 0.02

    def inject(self, backbone: nn.Module) -> None:
        for name, module in find_modules(backbone, list(self.targets)):
            if isinstance(module, nn.Identity):
                continue  # e.g. timm's attn.norm placeholder
            if not isinstance(module, _FOLDABLE):
                raise NotSupported(
                    f"SSF target {name!r} is a {type(module).__name__}; it scales linear, conv and norm outputs"
                )
            if getattr(module, "weight", None) is None:
                raise NotSupported(f"SSF target {name!r} has no affine weight to scale")
            width, channel_dim = _width_and_channel_dim(module)
            scale_shift = SSFScaleShift(width, self.init, self.std, channel_dim, device=module.weight.device)
            attach(module, "ssf", scale_shift)
