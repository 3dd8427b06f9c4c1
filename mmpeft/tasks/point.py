"""Point-cloud classification: the shared classification task on [B, N, 3] clouds, with test-time voting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn

from mmpeft.tasks.classification import ImageClassification

__all__ = ["PointClassification", "vote_logits"]


def vote_logits(forward: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """Logits [B, classes] of a batch: `forward(points)` for [B, N, C], the mean over the V passes for [B, V, N, C]
    (Point-MAE averages the logits of its votes)."""
    if points.dim() != 4:
        return forward(points)
    b, v = points.shape[:2]
    return forward(points.flatten(0, 1)).unflatten(0, (b, v)).mean(dim=1)


class PointClassification(ImageClassification):
    """Top-1 classification of point clouds (ScanObjectNN, ModelNet40, the shapes quickstart).

    Voting: a batch of [B, V, N, 3] (the datamodule's `votes` > 1 makes V augmented copies of each test
    cloud) averages the V logits per cloud, as Point-MAE's voting does (one pass, not Point-MAE's max
    over 300 repeated votings). A datamodule whose protocol selects the model on the test split (the
    papers' `protocol: paper`) has its `protocol_note` repeated in the run log when fitting starts."""

    def forward(self, inputs: Any) -> torch.Tensor:
        return vote_logits(self.model, inputs) if isinstance(inputs, torch.Tensor) else self.model(inputs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        note = getattr(getattr(self.trainer, "datamodule", None), "protocol_note", None)
        if note:
            rank_zero_warn(note)
