"""SSF: Scaling & Shifting Your Features (Lian et al., NeurIPS 2022; code dongzelian/SSF)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import attach
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import ScaleShift, composable_norm
from mmpeft.core.targets import select_modules

__all__ = ["SSF", "VIT_POSITIONS", "DEFAULT_TARGETS"]

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


def every_scalable_layer(backbone: nn.Module) -> list[str]:
    """SSF's default off the ViT: after every linear, convolution and affine norm that has a bias (UNet,
    DiT, convnets), so the merge stays exact and free. Bias-free layers (a UNet's to_q / to_k / to_v)
    and norms without an affine weight (DiT's adaLN-Zero LayerNorms) have nothing to fold a shift into."""
    return [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, _FOLDABLE) and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None
    ]


DEFAULT_TARGETS = {"token": VIT_POSITIONS, "*": every_scalable_layer}


@register_method
@dataclass
class SSF(Method):
    """SSF: `y * gamma + beta` per channel after each targeted layer. On a ViT the official 8
    positions: the patch projection, in every block after norm1, qkv (2304 wide, before the head
    split), proj, norm2, fc1 (before GELU) and fc2, and after the final norm: 205,824 trainable on
    ViT-B/16. Convolutions and BatchNorms are scaled on channel dim 1, so SSF also runs on
    convnets with conv/BN name patterns.

    On other backbone families (UNets, DiTs, timm convnets) the default is every linear, convolution
    and affine norm output that has a bias, so the merge stays free (no paper fixes SSF's positions
    there); `targets` takes module-name patterns, each of which must match.

    Init gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as released, so the model is *not* the backbone at
    step 0. gamma and beta take no weight decay (1-D). The frozen backbone stays in train mode so
    the recipe's drop-path is active. Merge folds every factor into the layer it follows
    (W' = diag(gamma) W, b' = gamma b + beta; LayerNorm affine likewise): the merged model has
    exactly the backbone's keys and shapes (a layer without bias, e.g. a bias-free qkv, makes
    `merge` refuse, since folding the shift would need a new tensor) and loads into plain timm (the paper describes this
    re-parameterisation; the official repo ships no merge code, SSF issue #19).
    Memory (`lean_memory`, on by default; `mmpeft bench --memory` shows it): the official code keeps each
    pre-scale activation for gamma's gradient, 8 per block. Here a scale-shift after a LayerNorm runs the norm
    with the composed affine (weight·γ, bias·γ + β), so it keeps nothing beyond the norm's input, and one
    after a linear runs the linear, scales its fresh output in place and keeps that output, which the next
    layer (GELU after fc1, attention after qkv) keeps anyway, recovering the activation as (out − β)/γ
    (`ScaleShift`); in place, the step allocates no second activation and under bf16 autocast the kept output
    stays bf16, shared with attention's. Convolutions and BatchNorms keep the
    official save (convnets follow them with in-place activations, which would change a kept output).
    Outputs and gradients are the same up to rounding (a test checks both); it does not change the recipe.
    Necessary step cost: per scaled layer one elementwise pass in forward and, in backward, x's gradient g ⊙ γ
    and γ's and β's reductions sum_n g ⊙ y and sum_n g: memory-bound passes over every layer's output, about a
    tenth of a ViT-B step in fp32 and more in bf16, where the matmuls shrink and these passes do not.
    The `paper` preset also initialises the head as SSF's timm ViT does (`models/vision_transformer.py`
    `init_weights_vit_timm`: trunc_normal(0.02), zero bias). The rest of the recipe lives in the configs:
    timm's per-epoch cosine with 10 cooldown epochs at the minimum lr (`schedule: timm_cosine`), and for
    FGVC weight decay 0.05, a model EMA (0.9998) and RandomResizedCrop with 0.5 / 0.5 normalisation.
    """

    name: ClassVar[str] = "ssf"
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"init": "normal", "std": 0.02, "head_init": "trunc_normal:0.02"}}

    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": (
                "module-name patterns (globs) of the layers whose output is scaled and shifted, each must match; "
                "unset: the 8 official ViT positions on token backbones, else every linear / conv / norm with a bias"
            )
        },
    )  # None: the family default (the 8 ViT positions on token backbones)
    init: str = field(
        default="normal",
        metadata={
            "help": '"normal" (gamma ~ N(1, std), beta ~ N(0, std), as released) or "identity" (gamma 1, beta 0)'
        },
    )
    std: float = field(default=0.02, metadata={"help": "standard deviation of the normal init of gamma and beta"})
    lean_memory: bool = field(
        default=True,
        metadata={
            "help": (
                "keep no activation of its own for backward: after a norm, run the norm with the composed "
                "affine; elsewhere recover the pre-scale activation from the saved output (same function and "
                "gradients, "
                "up to rounding); false: save the pre-scale activation, as the official code"
            )
        },
    )

    def inject(self, backbone: nn.Module) -> None:
        for _, name, module in select_modules(backbone, "SSF", self.targets, DEFAULT_TARGETS):
            if isinstance(module, nn.Identity):
                continue  # e.g. timm's attn.norm placeholder
            if not isinstance(module, _FOLDABLE):
                raise NotSupported(
                    f"SSF target {name!r} is a {type(module).__name__}; it scales linear, conv and norm outputs"
                )
            if getattr(module, "weight", None) is None:
                raise NotSupported(f"SSF target {name!r} has no affine weight to scale")
            width, channel_dim = _width_and_channel_dim(module)
            runs_host = type(module) is nn.Linear or composable_norm(module) is not None  # see ScaleShift
            scale_shift = ScaleShift(width, self.init, self.std, channel_dim, device=module.weight.device)
            attach(module, "ssf", scale_shift, where="replace" if self.lean_memory and runs_host else "output")
