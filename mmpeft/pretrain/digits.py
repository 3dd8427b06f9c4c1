"""The digits ViT's upstream pretraining: full training on all ten upright digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpeft.backbones.digits import DigitsViT
from mmpeft.core.model import PeftModel
from mmpeft.data.digits import DigitsDataModule
from mmpeft.pretrain.common import fixed_threads, pretrain_classifier

__all__ = ["pretrain_digits_vit"]


def pretrain_digits_vit(path: Path, recipe: dict[str, Any], arch: dict[str, Any], progress: bool = True) -> dict:
    """Train a DigitsViT from scratch on the upstream digits and write its backbone weights to `path`."""
    with fixed_threads(recipe["threads"]):
        torch.manual_seed(recipe["seed"])
        model = PeftModel(DigitsViT(pretrained=False), "full", num_classes=10)
        data = DigitsDataModule("upstream", batch_size=recipe["batch_size"], seed=recipe["seed"], train_fraction=0.9,
                                val_fraction=0.1)  # fmt: skip
        return pretrain_classifier(model, data, path, recipe, arch, "pretraining the digits ViT (upstream)", progress)
