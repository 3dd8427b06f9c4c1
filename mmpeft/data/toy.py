"""Small offline datasets built from scikit-learn's bundled digits, for the task families beyond
classification: a regression target and "latents" for denoising. They exist so every task family
runs end to end on a CPU in seconds (tests, smoke runs, examples), not as benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders

__all__ = ["ToyRegressionDataModule", "DigitLatentsDataModule", "digit_latents"]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images [N, 1, 8, 8] in [-1, 1] and labels [N]."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = torch.from_numpy((digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5).unsqueeze(1)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def _split(n: int, seed: int, fractions: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(fractions[0] * n), int(fractions[1] * n)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


class _SplitDataModule(SplitLoaders, pl.LightningDataModule):
    """Train / val / test tensors, split once with the run's seed."""

    def __init__(self, batch_size: int, seed: int, val_fraction: float, test_fraction: float, num_workers: int):
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.fractions = (val_fraction, test_fraction)
        self.splits: dict[str, TensorDataset] = {}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        tensors = self.tensors()
        for name, idx in zip(("train", "val", "test"), _split(len(tensors[0]), self.seed, self.fractions)):
            self.splits[name] = TensorDataset(*(t[idx] for t in tensors))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return split_loader(self.splits[split], self.batch_size, shuffle, self.seed, num_workers=self.num_workers)


class ToyRegressionDataModule(_SplitDataModule):
    """Digit images -> a fixed random smooth function of them, `out_dim` wide (no classes, so no head:
    the backbone's pooled features are the prediction and the task is MSE)."""

    def __init__(self, out_dim: int = 128, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, num_workers: int = 0):  # fmt: skip
        super().__init__(batch_size, seed, val_fraction, test_fraction, num_workers)
        self.out_dim = out_dim

    def tensors(self) -> tuple[torch.Tensor, ...]:
        images, _ = _digits()
        projection = torch.randn(images[0].numel(), self.out_dim, generator=torch.Generator().manual_seed(1234))
        targets = torch.tanh(images.flatten(1) @ projection / images[0].numel() ** 0.5)
        return images, targets


def digit_latents(images: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """Digit images as `channels`-channel "latents" (the image, its mirror, its transpose, its negative...)."""
    views = [images, images.flip(-1), images.transpose(-1, -2), -images]
    return 0.5 * torch.cat([views[i % len(views)] for i in range(channels)], dim=1)


class DigitLatentsDataModule(_SplitDataModule):
    """Digits as 8x8 latents with conditioning, for denoising tasks: `cond="class"` gives the label
    (a class-conditional DiT), `cond="text"` a fixed random [text_tokens, text_dim] "prompt embedding"
    per digit (a UNet's cross-attention), `cond="none"` nothing. Batches are (latents, cond)."""

    def __init__(self, cond: str = "text", channels: int = 4, text_tokens: int = 4, text_dim: int = 32,
                 batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 num_workers: int = 0):  # fmt: skip
        super().__init__(batch_size, seed, val_fraction, test_fraction, num_workers)
        if cond not in ("class", "text", "none"):
            raise ValueError(f"cond must be 'class', 'text' or 'none', got {cond!r}")
        self.cond, self.channels, self.text_tokens, self.text_dim = cond, channels, text_tokens, text_dim

    def tensors(self) -> tuple[torch.Tensor, ...]:
        images, labels = _digits()
        latents = digit_latents(images, self.channels)
        if self.cond == "class":
            return latents, labels
        if self.cond == "none":
            return latents, torch.zeros(len(labels))
        table = torch.randn(10, self.text_tokens, self.text_dim, generator=torch.Generator().manual_seed(1234))
        return latents, table[labels]
