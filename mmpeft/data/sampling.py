"""Training data as a function of (seed, epoch, position), so a run resumed from any checkpoint — mid-epoch
included — sees exactly the batches of the uninterrupted run.

- The order: `EpochShuffle` draws each epoch's permutation from (seed, epoch); Lightning calls `set_epoch` at
  the start of every training epoch (under DDP it substitutes a `DistributedSampler`, which is seeded from
  (seed, epoch) too). Plain loops that never call `set_epoch` get epoch 0, 1, 2, ... in turn.
- The batches: `EpochBatches` cuts the order into batches and never ends an epoch on a batch of one sample (a
  BatchNorm that trains cannot normalise one sample; it joins the batch before it, so few-shot runs lose
  nothing), or, with `drop_last`, drops the last partial batch (the point recipes, as the official code).
- The per-item randomness: every item is loaded under global torch / NumPy / Python RNGs seeded from
  (seed, epoch, index) and restored afterwards (`SeededItems`), so augmentations repeat whatever the worker
  count and wherever a resumed epoch starts, and loading draws nothing from the training step's RNG.
- The position: `ResumableLoader` has Lightning's `state_dict` / `load_state_dict`: the checkpoint records
  how many batches of which epoch were handed out, and a resumed epoch continues at the next one.

Evaluation loaders shard without padding under DDP (`UnrepeatedDistributedSampler`): every sample is evaluated
exactly once, so a test metric over 161 samples on 2 ranks is the metric over those 161 samples.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = [
    "EpochBatches",
    "EpochShuffle",
    "ItemDraw",
    "ResumableLoader",
    "SeededItems",
    "item_seed",
    "run_seed",
    "seeded_rngs",
    "shuffled_loader",
    "split_loader",
]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for loading item `index` in `epoch` of a run seeded `seed` (a hash: nearby triples give
    unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ItemDraw(NamedTuple):
    """What the loader asks `SeededItems` for: an item and the seed its loading draws from."""

    index: int
    seed: int


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the block under torch's (CPU), NumPy's and Python's global RNGs seeded from `seed`, then put them back.

    Only torch's CPU generator, the one it saves and restores: `torch.manual_seed` would also queue a lazy seed of
    every CUDA device, and a CUDA build of torch formats the whole call stack for each queued call (about a third
    of a small quickstart run's time went there, once per loaded item)."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class SeededItems(Dataset):
    """A dataset whose items load under RNGs seeded by their `ItemDraw` (plain indices load as they are)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, draw: ItemDraw | int) -> Any:
        if not isinstance(draw, ItemDraw):
            return self.dataset[draw]
        with seeded_rngs(draw.seed):
            return self.dataset[draw.index]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (labels, classes, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) when the epoch's order is drawn, so it does not depend on when
    the DataLoader builds its iterator (Lightning builds the first one after `set_epoch` and later ones before
    it). `generator` (the DataLoader's, for worker seeds) is re-seeded from (seed, epoch) too."""

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
    """The sampler's order cut into batches of `ItemDraw`s, never ending on a batch of one (a final single
    sample joins the batch before it); `drop_last` drops the last partial batch.

    Works on any sampler with `epoch` and `seed` (ours, or the `DistributedSampler` Lightning puts in its
    place under DDP). `resume_point = (epoch, batches)` makes that epoch start after its first `batches`
    batches; `current` is (epoch, batches skipped) of the epoch being drawn."""

    resume_point: tuple[int, int] | None = None
    current: tuple[int, int] = (0, 0)

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False):
        super().__init__(sampler, batch_size, drop_last)

    def __iter__(self) -> Iterator[list[ItemDraw]]:  # a generator: the order is drawn at the first batch
        epoch, seed = int(getattr(self.sampler, "epoch", 0)), int(getattr(self.sampler, "seed", 0))
        order = [ItemDraw(int(i), item_seed(seed, epoch, int(i))) for i in self.sampler]
        size = self.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) == 1 and len(batches) > 1:
                last = batches.pop()
                batches[-1] = batches[-1] + last
        skip = 0
        if self.resume_point is not None and self.resume_point[0] == epoch:
            skip, self.resume_point = self.resume_point[1], None
        self.current = (epoch, skip)
        yield from batches[skip:]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)  # type: ignore[arg-type]
        if self.drop_last:
            return full
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


class ResumableLoader(DataLoader):
    """A training DataLoader over `EpochBatches` that Lightning saves and restores: its state is the epoch
    and how many of its batches were handed out (Lightning does not prefetch from a sized loader, so that is
    how many were trained on when a checkpoint is written)."""

    _handed_out = 0

    def __iter__(self) -> Iterator[Any]:
        self._handed_out = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, skipped = getattr(self.batch_sampler, "current", (0, 0))
        return {"epoch": int(epoch), "batches": int(skipped + self._handed_out)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = self.batch_sampler
        if not isinstance(batches, EpochBatches):
            return
        epoch, done = int(state["epoch"]), int(state["batches"])
        batches.resume_point = None if done >= len(batches) else (epoch, done)


def shuffled_loader(
    dataset: Dataset, batch_size: int, seed: int, drop_last: bool = False, **kwargs: Any
) -> ResumableLoader:
    """A training DataLoader whose order, batches and per-item draws depend only on (seed, epoch, position)."""
    sampler = EpochShuffle(len(dataset), seed)  # type: ignore[arg-type]
    batches = EpochBatches(sampler, batch_size, drop_last)
    return ResumableLoader(SeededItems(dataset), batch_sampler=batches, generator=sampler.generator, **kwargs)


def run_seed() -> int:
    """The run's seed (`seed_everything`, which Lightning exports as PL_GLOBAL_SEED), for data modules
    that take none of their own."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def _evaluation_sampler(dataset: Dataset) -> Sampler[int] | None:
    """Under DDP, each rank's share of an evaluation split without padding (None: one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def split_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """The loader of one split: training shuffles as a function of (seed, epoch) (`drop_last`: drop the last
    partial batch); evaluation keeps the order, evaluates every sample exactly once (also under DDP) and gets
    its own generator, so iterating it draws nothing from the global RNG (which resumes exactly)."""
    if shuffle:
        return shuffled_loader(dataset, batch_size, run_seed() if seed is None else seed, drop_last, **kwargs)
    sampler = _evaluation_sampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **kwargs)
