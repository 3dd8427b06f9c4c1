"""A small ViT pretrained by mmpeft itself on the upstream digits, so the quickstart is a real transfer.

Its weights are built on first use (about a minute on 2 CPU cores) by the pretraining registered for
"digits_vit" (`mmpeft.pretrain.digits`: the backbone knows no training loop or dataset) and cached;
the cache key is a hash of the architecture and the pretraining recipe, so changing either rebuilds it.
"""

from __future__ import annotations

from mmpeft.backbones.registry import register_backbone
from mmpeft.backbones.timm_vit import TimmViT
from mmpeft.backbones.weights import cache_dir, load_quickstart_weights, register_weights_builder

__all__ = ["DigitsViT", "cache_dir", "ARCH", "RECIPE"]

ARCH = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 128, "depth": 4, "num_heads": 4}
# "order": the training order's version (2: a function of (seed, epoch)), part of the cache key; "threads": the torch
# thread count the pretraining runs under, whatever the machine's (`pretrain.common`; 2 gives the weights the README's
# 2-core numbers were made with)
RECIPE = {"epochs": 40, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64, "warmup_epochs": 3, "seed": 0, "order": 2,
          "threads": 2}  # fmt: skip


# the upstream pretraining that builds its weights (a lazy path: backbones never import the pretrain layer)
register_weights_builder("digits_vit", "mmpeft.pretrain.digits:pretrain_digits_vit")


@register_backbone(
    "digits_vit", description="the quickstart's 0.8M-parameter ViT, pretrained by mmpeft on the upstream digits"
)
class DigitsViT(TimmViT):
    """A 0.8M-parameter ViT at the digits' native 8x8 resolution (patch 2, 16 patches + CLS).

    Args:
        pretrained: load (building on first use) mmpeft's upstream-pretrained weights; False: random init.
        weights: a weights file instead (e.g. one copied from another machine's cache).
        epochs: the pretraining budget (part of the cache key).
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None, epochs: int | None = None):
        super().__init__("vit_tiny_patch16_224", **ARCH)
        self.name = "digits_vit"
        load_quickstart_weights(self, "digits_vit", ARCH, RECIPE, pretrained, weights, epochs)
