"""Regression: the model's output (the backbone's pooled features, or a head's) against real targets, MSE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.tasks.base import PeftTask

__all__ = ["Regression"]


class Regression(PeftTask):
    """Mean-squared error on every output; `val/loss` (lower is better) selects and summarises runs."""

    monitor = "val/loss"
    monitor_mode = "min"

    def loss_and_metrics(self, output: torch.Tensor, targets: Any, stage: str) -> torch.Tensor:
        loss = F.mse_loss(output.float(), targets.float())
        self.log_epoch("loss", loss.detach(), targets.shape[0], stage, prog_bar=stage != "train")
        return loss
