"""Image classification: cross-entropy, top-1 accuracy per split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.tasks.base import PeftTask

__all__ = ["ImageClassification"]


class ImageClassification(PeftTask):
    """Top-1 classification. Extra args: `label_smoothing` (0 by default, as in the VTAB recipes)."""

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, *args: Any, label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def loss_and_metrics(self, output: torch.Tensor, targets: Any, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(output, targets, label_smoothing=smoothing)
        acc = (output.argmax(-1) == targets).float().mean()
        n = targets.shape[0]
        self.log_epoch("loss", loss.detach(), n, stage)
        self.log_epoch("acc", acc, n, stage, prog_bar=stage != "train")
        return loss
