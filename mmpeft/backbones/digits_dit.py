"""A tiny pixel-space class-conditional DiT pretrained by mmpeft itself on the upstream (upright) digits, so the
digits-diffusion quickstart is a real transfer: fine-tuning it to the rotated digits.

Its weights are built on first use by the pretraining registered for "digits_dit" (`mmpeft.pretrain.digits_dit`)
and cached; the cache key is a hash of the architecture and the recipe, so changing either rebuilds it.
"""

from __future__ import annotations

from mmpeft.backbones.dit import DiffusersDiT
from mmpeft.backbones.registry import register_backbone
from mmpeft.backbones.weights import load_quickstart_weights, register_weights_builder

__all__ = ["DigitsDiT", "DIGITS_DIT", "DIGITS_DIT_RECIPE", "DIGITS_SCHEDULE"]

# the digits' native 8x8 single-channel pixels, patch 2 (16 tokens), ten classes (+ the guidance null row)
DIGITS_DIT = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
# DDPM's pixel-space schedule (Ho et al. 2020: linear betas 1e-4 -> 0.02 over 1000 steps), ε-prediction
DIGITS_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                   "prediction_type": "epsilon"}  # fmt: skip
# (diffusers' label embedding drops 10% of the labels to the null class in training: classifier-free guidance)
DIGITS_DIT_RECIPE = {"epochs": 100, "lr": 2e-3, "weight_decay": 0.0, "batch_size": 64, "warmup_epochs": 2, "seed": 0,
                     "threads": 2}  # fmt: skip

register_weights_builder("digits_dit", "mmpeft.pretrain.digits_dit:pretrain_digits_dit")


@register_backbone(
    "digits_dit", description="the digits-diffusion quickstart's pixel DiT, pretrained by mmpeft on upright digits"
)
class DigitsDiT(DiffusersDiT):
    """A 0.2M-parameter class-conditional DiT on 8x8 digit pixels (in [-1, 1], one channel).

    Args:
        pretrained: load (building on first use) mmpeft's upstream-pretrained weights; False: random init.
        weights: a weights file instead.
        epochs: the pretraining budget (part of the cache key).
        add_classes / new_class_init: new labels 10.. after the ten digits (personalization: a new digit style as
            a new class) and the digit each starts from, added after the pretrained weights load
            (`DiffusersDiT.add_class_rows`).
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None, epochs: int | None = None,
                 add_classes: int = 0, new_class_init: list[int] | None = None):  # fmt: skip
        super().__init__(config=dict(DIGITS_DIT), name="digits_dit", example_size=8)
        load_quickstart_weights(self, "digits_dit", DIGITS_DIT, DIGITS_DIT_RECIPE, pretrained, weights, epochs)
        if add_classes:
            self.add_class_rows(add_classes, new_class_init)
