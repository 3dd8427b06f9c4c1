"""Image classification: cross-entropy, top-1 accuracy per split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.tasks.base import PeftTask

__all__ = ["ImageClassification"]


class ImageClassification(PeftTask):
    """Top-1 classification. Extra args: `label_smoothing` (0 by default, as in the VTAB recipes).

    The cached linear probe (`feature_cache`, "auto" by default: on exactly when nothing in the backbone trains
    and no method piece is attached, i.e. method `linear`): the frozen backbone, in eval mode, runs once per
    training and validation input; its pooled features are kept (`mmpeft.core.cache.ContentCache`, keyed by a
    hash of the input tensor, `feature_cache_bytes` at most, 2 GiB by default) and later epochs run only the
    head on them: no backbone forward after the first epoch, and the losses, predictions and head gradients
    of the uncached probe (bit-identical on CPU; on GPU up to the rounding a batch's composition may cause in
    the backbone's kernels). It pays off with deterministic transforms (VTAB-1k's resize, the digits'
    downstream task); random augmentation makes new inputs every epoch, which the second epoch detects: one
    warning, and the training cache is dropped and turned off. A frozen backbone left in train mode
    (dropout, drop-path) turns it off too. `true` refuses any other method; `false` turns it off. Test and
    predict run the backbone as usual (once each).
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, *args: Any, label_smoothing: float = 0.0, feature_cache: bool | str = "auto", **kwargs: Any):
        super().__init__(*args, feature_cache=feature_cache, **kwargs)
        self.label_smoothing = label_smoothing

    def loss_and_metrics(self, output: torch.Tensor, targets: Any, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(output, targets, label_smoothing=smoothing)
        acc = (output.argmax(-1) == targets).float().mean()
        n = targets.shape[0]
        self.log_epoch("loss", loss.detach(), n, stage)
        self.log_epoch("acc", acc, n, stage, prog_bar=stage != "train")
        return loss
