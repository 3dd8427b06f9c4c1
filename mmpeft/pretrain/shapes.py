"""The shapes point transformer's upstream pretraining: full training on the ten primitive shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpeft.backbones.shapes import ShapesPointTransformer
from mmpeft.core.model import PeftModel
from mmpeft.data.shapes import ShapesDataModule
from mmpeft.pretrain.common import fixed_threads, pretrain_classifier

__all__ = ["pretrain_shapes_point"]


def pretrain_shapes_point(path: Path, recipe: dict[str, Any], arch: dict[str, Any], progress: bool = True) -> dict:
    """Train a ShapesPointTransformer from scratch on the upstream shapes and write its weights to `path`, under
    the recipe's fixed thread count (so the weights do not depend on the machine's; see `pretrain.common`)."""
    with fixed_threads(recipe["threads"]):
        torch.manual_seed(recipe["seed"])
        model = PeftModel(ShapesPointTransformer(pretrained=False), "full", num_classes=10)
        data = ShapesDataModule(
            "upstream", train_per_class=recipe["per_class"], val_per_class=20, test_per_class=0,
            num_points=arch["num_points"], batch_size=recipe["batch_size"], seed=recipe["seed"],
        )  # fmt: skip
        desc = "pretraining the shapes point transformer"
        return pretrain_classifier(model, data, path, recipe, arch, desc, progress)
