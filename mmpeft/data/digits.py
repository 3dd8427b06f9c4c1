"""The 8x8 digit images bundled with scikit-learn, as an offline transfer benchmark.

The 1,797 images are split once, with a fixed seed, into an *upstream* pool (70%, all ten
digits, trained with one-pixel shift augmentation) used by mmpeft to pretrain a small ViT, and a
*downstream* pool (the other 30%) whose images are rotated by 90 degrees: the same classes seen
from a new angle, so pretrained features help but do not solve it. The downstream pool is split
into train / val / test with the run's seed; few-shot runs keep k training images per class of that split
(`shots`, drawn with `shot_seed`), so val and test stay the same whichever subset trains.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders

__all__ = ["DigitsDataModule", "digits_arrays", "UPSTREAM_FRACTION"]

UPSTREAM_FRACTION = 0.7
_POOL_SEED = 1234  # fixed: the upstream/downstream partition never depends on a run's seed
TASKS = ("upstream", "downstream")


def digits_arrays(task: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 8, 8] in [-1, 1], labels [N]) of one pool; downstream images are rotated 90 degrees."""
    if task not in TASKS:
        raise ValueError(f"digits task must be one of {TASKS}, got {task!r}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(_POOL_SEED).permutation(len(labels))
    cut = int(round(UPSTREAM_FRACTION * len(labels)))
    idx = order[:cut] if task == "upstream" else order[cut:]
    images, labels = images[idx], labels[idx]
    if task == "downstream":
        images = np.rot90(images, k=1, axes=(1, 2)).copy()
    return images[:, None], labels


class ShiftedDigits(Dataset):
    """Images with optional random one-pixel shifts (zero-filled), drawn from the loader's RNG."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, shift: int = 0):
        self.images, self.labels, self.shift = torch.from_numpy(images), torch.from_numpy(labels), shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.shift:
            s, (h, w) = self.shift, image.shape[1:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = F.pad(image, (s, s, s, s), value=-1.0)[:, dy : dy + h, dx : dx + w]
        return image, self.labels[i]


def _split(labels: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Stratified train / val / test indices."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)


class DigitsDataModule(SplitLoaders, pl.LightningDataModule):
    """scikit-learn's digits: `task="upstream"` (pretraining) or `"downstream"` (the transfer task).

    Args:
        task: which pool.
        batch_size: per step.
        seed: the train / val / test split of the pool (stratified).
        train_fraction, val_fraction: of the pool; the rest is the test split.
        shots: keep k training images per class (few-shot) of the training split; val and test are unchanged.
        shot_seed: the seed of that subset (default `seed + 1`); vary it alone for k-shot runs over seeds on the
            same val / test splits.
        shift: random pixel shift of training images (upstream default 1, downstream 0).
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        task: str = "downstream",
        batch_size: int = 64,
        seed: int = 0,
        train_fraction: float = 0.5,
        val_fraction: float = 0.2,
        shots: int | None = None,
        shot_seed: int | None = None,
        shift: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"digits task must be one of {TASKS}, got {task!r}")
        if shots is not None and shots < 1:
            raise ValueError(f"shots must be a positive number of images per class, got {shots}")
        if not (0 < train_fraction and 0 <= val_fraction and train_fraction + val_fraction <= 1):
            raise ValueError("need 0 < train_fraction and train_fraction + val_fraction <= 1")
        self.save_hyperparameters()
        self.shift = (1 if task == "upstream" else 0) if shift is None else shift
        self.splits: dict[str, ShiftedDigits] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        images, labels = digits_arrays(hp.task)
        train, val, test = _split(labels, (hp.train_fraction, hp.val_fraction), hp.seed)
        if hp.shots:
            shot_seed = hp.seed + 1 if hp.shot_seed is None else hp.shot_seed
            train = train[k_shot_indices(labels[train], hp.shots, shot_seed)]
        self.splits = {
            "train": ShiftedDigits(images[train], labels[train], self.shift),
            "val": ShiftedDigits(images[val], labels[val]),
            "test": ShiftedDigits(images[test], labels[test]),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        hp = self.hparams
        return split_loader(self.splits[split], hp.batch_size, shuffle, hp.seed, num_workers=hp.num_workers)
