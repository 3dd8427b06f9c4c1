"""Training order as a function of (seed, epoch), so a run resumed from a checkpoint sees the same batches
as the uninterrupted run.

A DataLoader shuffling with a generator seeded once draws every epoch's order from where the previous
epoch left the generator; a resumed run re-creates the generator and replays epoch 0's order. Here the
generator is re-seeded from (seed, epoch) whenever Lightning calls `set_epoch` (it does at the start of
every training epoch), and the same generator seeds the DataLoader's workers, so augmentation in
workers repeats too. Plain loops that never call `set_epoch` get epoch 0, 1, 2, ... in turn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffle", "shuffled_loader", "split_loader", "run_seed"]


class EpochShuffle(Sampler[int]):
    """The order comes from its own generator, seeded from (seed, epoch) when the epoch's order is drawn, so
    it does not depend on when the DataLoader builds its iterator (Lightning builds the first one after
    `set_epoch` and later ones before it). `generator` (the DataLoader's, for worker seeds) is re-seeded
    from (seed, epoch) too."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self) -> Iterator[int]:
        order_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 500_000)
        order = torch.randperm(self.size, generator=order_generator).tolist()
        self.set_epoch(self.epoch + 1)  # a loop that never calls set_epoch still gets a new order next time
        return iter(order)

    def __len__(self) -> int:
        return self.size


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> DataLoader:
    """A training DataLoader whose order and worker seeds depend only on (seed, epoch)."""
    sampler = EpochShuffle(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=sampler.generator, **kwargs)


def run_seed() -> int:
    """The run's seed (`seed_everything`, which Lightning exports as PL_GLOBAL_SEED), for data modules
    that take none of their own."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def split_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None, **kwargs: Any
) -> DataLoader:
    """The loader of one split: training shuffles as a function of (seed, epoch); evaluation keeps the order
    and gets its own generator, so iterating it draws nothing from the global RNG (which resumes exactly)."""
    if shuffle:
        return shuffled_loader(dataset, batch_size, run_seed() if seed is None else seed, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, generator=torch.Generator(), **kwargs)
