"""`TrajectoryDataModule`: the "data" of data-free distillation — which teacher path and which step each optimizer
step visits (EfficientDM: 160 paths of 100 DDIM steps, one optimizer step per denoising step)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TrajectoryDataModule"]

VAL_SEED_OFFSET = 1_000_000  # validation paths never coincide with training ones


class TrajectoryDataModule(pl.LightningDataModule):
    """Items (path seed, step index) in path order, one per training step: `trajectories` paths of `steps` steps
    (each path's noise and conditioning drawn from its seed), and `val_trajectories` fixed paths for validation.

    Args:
        trajectories: training paths (the official 160).
        steps: denoising steps per path (the official 100; the method's `steps`, checked by the task).
        val_trajectories: paths the per-step error against the teacher is measured on.
        seed: the first path's seed.
    """

    def __init__(self, trajectories: int = 160, steps: int = 100, val_trajectories: int = 1, seed: int = 0):
        super().__init__()
        if trajectories < 1 or steps < 1 or val_trajectories < 0:
            raise ValueError("trajectories and steps must be positive, val_trajectories non-negative")
        self.trajectories, self.steps, self.val_trajectories, self.seed = trajectories, steps, val_trajectories, seed

    def _items(self, paths: int, offset: int) -> TensorDataset:
        seeds = torch.arange(paths).repeat_interleave(self.steps) + self.seed + offset
        steps = torch.arange(self.steps).repeat(paths)
        return TensorDataset(seeds, steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._items(self.trajectories, 0), batch_size=1, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._items(self.val_trajectories, VAL_SEED_OFFSET), batch_size=1, shuffle=False)
