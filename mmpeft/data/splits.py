"""The four dataloaders of a datamodule whose splits are named "train" / "val" / "test"."""

from __future__ import annotations

from torch.utils.data import DataLoader

__all__ = ["SplitLoaders"]


class SplitLoaders:
    """Mixin: a datamodule implements `_loader(split, shuffle)` and gets train (shuffled), val, test and
    predict (the test split) dataloaders from it."""

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
