"""Point-cloud classification: ScanObjectNN (the official h5 files) and ModelNet40 (Point-BERT's pickles or the
raw txt files), read as the official repositories read them.

Batches are `(points [B, N, C], labels [B])`, float32 / int64, C = 3 (xyz) or 6 (xyz + normals, ModelNet40 with
`use_normals`). With `votes=V > 1` the test loader yields `[B, V, N, C]`: V augmented copies of every cloud, each
a fresh random N-of-ceil(1.2 N) subset plus `vote_augment` (Point-MAE's ModelNet40 voting), seeded by (seed, item),
so a task averages the logits of the V passes (`mmpeft.tasks.point.vote_logits`). Validation never votes.

Resampling follows the official "FPS to 1.2 N (capped at the cloud's size), then a random N-subset" for training
and "FPS to N" for evaluation. Clouds are stored in farthest-point order once, when loaded: Point-BERT's pickles
already are (their first k points are the FPS to k), other clouds with more than N points are ordered by
`farthest_point_order` (pure PyTorch, starting at point 0; a one-time cost of about a minute for the full
PB_T50_RS or txt ModelNet40 on CPU). So evaluation takes the first N points and training draws N of the first
ceil(1.2 N) in random order, which is also the per-epoch point shuffle (with N = 2048 on ScanObjectNN's 2048
points it is exactly a shuffle, as in the official code). Each training item's subset and augmentation come from
one generator seeded from torch's RNG, which the loader seeds per (seed, epoch) in workers and the run seeds and
checkpoints in the main process, so a resumed run repeats them.

Neither dataset has a validation split. Protocol "final" (default) carves a class-stratified `val_fraction` of
the official train split (seeded by `seed`) for model selection and evaluates the test split once; protocol
"paper" validates on the test split, as every official repository does, which selects the reported epoch on
the test set: it warns, and `protocol_note` says so for the run log.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import DataError, layout_hint
from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.point_transforms import (
    AUGMENTS,
    Compose,
    PointTransform,
    RandomSubset,
    build_augment,
    farthest_point_order,
)
from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders

__all__ = [
    "PROTOCOLS",
    "TRAIN_POOL",
    "MissingPointData",
    "PointClouds",
    "PointDataModule",
    "fps_prefix",
    "stratified_split",
]

PROTOCOLS = ("final", "paper")
TRAIN_POOL = 1.2  # official training resampling: FPS to 1.2 N, then a random N-subset


class MissingPointData(DataError, FileNotFoundError):
    """A dataset file or folder is missing (a `DataError` that is also a FileNotFoundError, as fgvc.py raises)."""


# -- the dataset and voting ---------------------------------------------------------------------------------------
class PointClouds(Dataset):
    """Clouds [n, K, C] stored in FPS order (or their file order when K == N) with labels [n].

    No `transform`: the first `num_points` points (evaluation). A `transform` (training: random subset, then the
    augmentation): one copy per item from a generator seeded off torch's RNG. A `transform` and `votes` V: V
    copies [V, N, C] from a generator seeded by (`seed`, item), the same on every pass.
    """

    def __init__(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        num_points: int,
        transform: PointTransform | None = None,
        votes: int | None = None,
        seed: int = 0,
    ):
        self.points, self.labels, self.num_points = points, labels, num_points
        self.transform, self.votes, self.seed = transform, votes, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cloud, label = self.points[i], self.labels[i]
        if self.transform is None:
            return cloud[: self.num_points], label
        if self.votes:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            return torch.stack([self.transform(cloud, generator) for _ in range(self.votes)]), label
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        return self.transform(cloud, generator), label


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices: `fraction` of every class held out (at least one of a class with two or
    more examples), chosen with `seed`."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = round(fraction * len(idx))
        if fraction > 0 and len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held += idx[:n_held].tolist()
        kept += idx[n_held:].tolist()
    return np.sort(np.array(kept, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def fps_prefix(points: torch.Tensor, keep: int, num_points: int, fps_ordered: bool) -> torch.Tensor:
    """Clouds cut to `keep` points in FPS order; all of them, in file order, when the cloud has just N points."""
    size = points.shape[1]
    if fps_ordered or num_points >= size:
        return points[:, : min(keep, size)].contiguous()
    order = farthest_point_order(points[..., :3], min(keep, size))
    return torch.gather(points, 1, order[..., None].expand(-1, -1, points.shape[-1])).contiguous()


# -- the shared datamodule ----------------------------------------------------------------------------------------
class PointDataModule(SplitLoaders, pl.LightningDataModule):
    """Protocols, splits, resampling and loaders; a dataset supplies `_load(split, keep)`."""

    num_classes: int
    layout: str = ""
    page: str = "README.md"  # its file in the repository's datasets/ folder
    title: str = ""

    def _check_args(self) -> None:
        hp = self.hparams
        if hp.protocol not in PROTOCOLS:
            raise UnknownName(
                f"unknown protocol {hp.protocol!r}; use 'final' (validation carved from train, test once) or "
                "'paper' (validation = the test split, as the papers)"
            )
        for name in ("augment", "vote_augment"):
            if hp[name] not in AUGMENTS:
                raise UnknownName(f"unknown {name} {hp[name]!r}; choose one of {AUGMENTS}")
        if not 0 < hp.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {hp.val_fraction}")
        if hp.num_points < 1 or hp.votes < 1:
            raise ValueError(f"num_points and votes must be positive, got {hp.num_points} and {hp.votes}")
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = 0
        self.protocol_note: str | None = None  # set only when selection sees the test set: a task warns with it
        if hp.protocol == "paper":
            self.protocol_note = (
                f"{self.title} protocol 'paper': validation IS THE TEST SPLIT, as in the official code, so model "
                "selection (best checkpoint, early stopping, sweeps) sees the test set and the reported accuracy is "
                "optimistic; use protocol='final' for a held-out estimate"
            )
            warnings.warn(self.protocol_note, UserWarning, stacklevel=3)

    @property
    def has_test_split(self) -> bool:
        return True

    @property
    def num_points(self) -> int:
        """Points per cloud in every batch (what a backbone's grouping must fit)."""
        return int(self.hparams.num_points)

    @property
    def point_channels(self) -> int:
        """Channels per point in every batch: 3 (xyz), 6 with normals."""
        return 3

    def _load(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clouds [n, K, C] float32 cut to `keep` points as `fps_prefix` does, labels [n] int64) of a split."""
        raise NotImplementedError

    def _checked(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        points, labels = self._load(split, keep)
        if points.shape[1] < self.hparams.num_points:
            raise DataError(
                f"{self.title} {split} clouds have {points.shape[1]} points, fewer than num_points="
                f"{self.hparams.num_points}"
            )
        return points, labels

    def setup(self, stage: str | None = None) -> None:
        """Read both official splits once, and cut the validation split out of train ("final")."""
        if self.data:
            return
        hp = self.hparams
        pool = math.ceil(TRAIN_POOL * hp.num_points)
        train_points, train_labels = self._checked("train", pool)
        test_points, test_labels = self._checked("test", pool if hp.votes > 1 else hp.num_points)
        self.pool = min(pool, train_points.shape[1])
        if hp.protocol == "final":
            kept, held = stratified_split(train_labels.numpy(), hp.val_fraction, hp.seed)
            self.data["val"] = (train_points[held], train_labels[held])
        else:
            kept = np.arange(len(train_labels))
            self.data["val"] = (test_points, test_labels)
        if hp.shots:  # few-shot: k training clouds per class, seeded
            kept = kept[k_shot_indices(train_labels[kept].tolist(), hp.shots, hp.seed + 1)]
        self.data["train"] = (train_points[kept], train_labels[kept])
        self.data["test"] = (test_points, test_labels)

    def train_transform(self) -> PointTransform:
        """A random `num_points` of the first ceil(1.2 N) FPS points, in random order, then the augmentation."""
        self.setup()
        return Compose([RandomSubset(self.hparams.num_points, self.pool), build_augment(self.hparams.augment)])

    def vote_transform(self) -> PointTransform:
        """One vote: a fresh random subset, as in training, then `vote_augment` (Point-MAE: scale and translate)."""
        self.setup()
        test_pool = min(self.pool, self.data["test"][0].shape[1])
        return Compose([RandomSubset(self.hparams.num_points, test_pool), build_augment(self.hparams.vote_augment)])

    def dataset(self, split: str) -> PointClouds:
        self.setup()
        hp = self.hparams
        points, labels = self.data[split]
        if split == "train":
            return PointClouds(points, labels, hp.num_points, self.train_transform())
        if split == "test" and hp.votes > 1:
            return PointClouds(points, labels, hp.num_points, self.vote_transform(), votes=hp.votes, seed=hp.seed)
        return PointClouds(points, labels, hp.num_points)

    def data_identity(self) -> str:
        """Which clouds the training split holds (dataset, files, protocol, split seed, shots), for derived state
        built from it (Point-PEFT's memory bank): the loader and augmentation settings are left out."""
        loading = ("batch_size", "num_workers", "augment", "vote_augment", "votes", "drop_last")
        kept = {k: v for k, v in self.hparams.items() if k not in loading and not k.startswith("_")}  # not the CLI's
        return f"{type(self).__name__} {json.dumps(kept, sort_keys=True, default=str)}"

    def training_clouds(self, batch_size: int) -> DataLoader:
        """The training split's clouds in order, without augmentation (the first `num_points` of each): what derived
        state such as Point-PEFT's memory bank is built from. Batches are (clouds, labels)."""
        self.setup()
        points, labels = self.data["train"]
        return split_loader(PointClouds(points, labels, self.hparams.num_points), batch_size, shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return split_loader(self.dataset(split), hp.batch_size, shuffle, drop_last=hp.drop_last,
                            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)  # fmt: skip

    def _missing(self, what: str) -> MissingPointData:
        return MissingPointData(f"{self.title}: {what}. {layout_hint(self.layout, self.page)}")
