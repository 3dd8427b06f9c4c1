"""Training order as a function of (seed, epoch), so a run resumed from a checkpoint sees the same batches
as the uninterrupted run.

A DataLoader shuffling with a generator seeded once draws every epoch's order from where the previous
epoch left the generator; a resumed run re-creates the generator and replays epoch 0's order. Here the
generator is re-seeded from (seed, epoch) whenever Lightning calls `set_epoch` (it does at the start of
every training epoch), and the same generator seeds the DataLoader's workers, so augmentation in
workers repeats too. Plain loops that never call `set_epoch` get epoch 0, 1, 2, ... in turn.

The batches are a function of that order alone (`EpochBatches`): an epoch never ends on a batch of one sample
(a BatchNorm that trains cannot normalise one sample; it joins the batch before it, so few-shot runs lose
nothing), or, with `drop_last`, the last partial batch is dropped (the point recipes, as the official code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = ["EpochShuffle", "EpochBatches", "shuffled_loader", "split_loader", "run_seed"]


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


class EpochBatches(BatchSampler):
    """The sampler's order cut into batches of `batch_size`, never ending on a batch of one: a final single
    sample joins the batch before it (which gets batch_size + 1). `drop_last` drops the last partial batch."""

    def __iter__(self) -> Iterator[list[int]]:  # a generator: the order is drawn at the first batch, not before
        order, size = list(self.sampler), self.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) == 1 and len(batches) > 1:
                last = batches.pop()
                batches[-1] = batches[-1] + last
        yield from batches

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)  # type: ignore[arg-type]
        if self.drop_last:
            return full
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, drop_last: bool = False, **kwargs: Any) -> DataLoader:
    """A training DataLoader whose order, batches and worker seeds depend only on (seed, epoch)."""
    sampler = EpochShuffle(len(dataset), seed)  # type: ignore[arg-type]
    batches = EpochBatches(sampler, batch_size, drop_last)
    return DataLoader(dataset, batch_sampler=batches, generator=sampler.generator, **kwargs)


def run_seed() -> int:
    """The run's seed (`seed_everything`, which Lightning exports as PL_GLOBAL_SEED), for data modules
    that take none of their own."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def split_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None, drop_last: bool = False, **kwargs: Any
) -> DataLoader:
    """The loader of one split: training shuffles as a function of (seed, epoch) (`drop_last`: drop the last
    partial batch; else a final batch of one joins the batch before it); evaluation keeps the order and every
    sample, and gets its own generator, so iterating it draws nothing from the global RNG (which resumes exactly)."""
    if shuffle:
        return shuffled_loader(dataset, batch_size, run_seed() if seed is None else seed, drop_last, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, generator=torch.Generator(), **kwargs)
