"""`EpochMean`: an epoch metric as the sample-weighted mean of per-batch means, exact across DDP ranks.

Lightning's own `sync_dist` mean averages the summed sample count in an integer tensor, which truncates on uneven
shards (161 test samples on 2 ranks were scored as 160); torchmetrics' `MeanMetric` drops the weights when told to
keep NaN. Here both sums are float64 states reduced by summation, and a NaN stays a NaN (a diverged run must show).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class EpochMean(Metric):
    """sum(batch mean x batch size) / sum(batch size), over the epoch and every rank."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, batch_size: int) -> None:
        self.total += value.detach().double() * batch_size
        self.count += batch_size

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()
