"""Image classification: cross-entropy, top-1 accuracy per split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.tasks.base import PeftTask

__all__ = ["ImageClassification"]


class ImageClassification(PeftTask):
    """Top-1 classification. Extra args: `label_smoothing` (0 by default, as in the VTAB recipes)."""

    def __init__(self, *args: Any, label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def loss_and_metrics(self, outputs: list[torch.Tensor], batch: Any, stage: str) -> torch.Tensor:
        targets = batch[1]
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(outputs[0], targets, label_smoothing=smoothing)  # further passes: the method's
        acc = (outputs[0].argmax(-1) == targets).float().mean()
        n = targets.shape[0]
        self.log(f"{stage}/loss", loss.detach(), on_step=stage == "train", on_epoch=True, batch_size=n)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        return loss
