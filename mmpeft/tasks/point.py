"""Point-cloud classification: the shared classification task on [B, N, 3] clouds, with test-time voting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn

from mmpeft.core.errors import ConfigMismatch
from mmpeft.tasks.classification import ImageClassification

__all__ = ["PointClassification", "vote_logits", "check_point_data"]


def vote_logits(forward: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """Logits [B, classes] of a batch: `forward(points)` for [B, N, C], the mean over the V passes for [B, V, N, C]
    (Point-MAE averages the logits of its votes)."""
    if points.dim() != 4:
        return forward(points)
    b, v = points.shape[:2]
    return forward(points.flatten(0, 1)).unflatten(0, (b, v)).mean(dim=1)


def check_point_data(backbone: Any, data: Any) -> None:
    """Refuse data the backbone cannot take, when model and data meet rather than at the first forward: clouds
    with more channels than the backbone reads (ModelNet40's normals on an xyz-only transformer), or fewer points
    than its grouping needs (`num_group` FPS centres, `group_size` nearest points each). Facts either side does
    not declare are not checked."""
    name = f"the {getattr(backbone, 'name', type(backbone).__name__)} backbone"
    data_name = type(data).__name__
    channels, takes = getattr(data, "point_channels", None), getattr(backbone, "in_channels", None)
    if channels is not None and takes is not None and channels != takes:
        normals = " (xyz + normals: use_normals true)" if channels == 6 else ""
        fix = "set --data.init_args.use_normals false" if normals else f"give it {takes}-channel clouds"
        raise ConfigMismatch(f"{data_name} gives clouds of {channels} channels{normals}, but {name} takes "
                             f"{takes} (xyz); {fix}")  # fmt: skip
    points = getattr(data, "num_points", None)
    groups, size = getattr(backbone, "num_group", None), getattr(backbone, "group_size", None)
    if points is None or groups is None or size is None or max(groups, size) <= points:
        return
    raise ConfigMismatch(
        f"{data_name} gives clouds of num_points={points} points, but {name} groups each cloud into "
        f"num_group={groups} FPS centres of group_size={size} nearest points, so it needs at least "
        f"{max(groups, size)}; raise --data.init_args.num_points or lower --model.init_args.backbone.init_args."
        f"{'group_size' if size > points else 'num_group'}"
    )


class PointClassification(ImageClassification):
    """Top-1 classification of point clouds (ScanObjectNN, ModelNet40, the shapes quickstart).

    Voting: a batch of [B, V, N, 3] (the datamodule's `votes` > 1 makes V augmented copies of each test
    cloud) averages the V logits per cloud, as Point-MAE's voting does (one pass, not Point-MAE's max
    over 300 repeated votings). A datamodule whose protocol selects the model on the test split (the
    papers' `protocol: paper`) has its `protocol_note` repeated in the run log when fitting starts."""

    def forward(self, inputs: Any) -> torch.Tensor:
        return vote_logits(self.model, inputs) if isinstance(inputs, torch.Tensor) else self.model(inputs)

    def setup(self, stage: str) -> None:
        """Before fit / validate / test / predict (the datamodule is set up first): the data must fit the model."""
        super().setup(stage)
        check_point_data(self.model.backbone, getattr(self.trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        note = getattr(getattr(self.trainer, "datamodule", None), "protocol_note", None)
        if note:
            rank_zero_warn(note)
