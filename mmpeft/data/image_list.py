"""A generic datamodule for user images listed in text files: `<relative/path> <label>` per line.

This is the list format VTAB-1k's common folder distribution uses, so the VTAB datamodule builds on it.

    root/
      train.txt        images/cat_001.jpg 0
      val.txt          images/dog_042.jpg 1
      test.txt         ...
      images/...
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.splits import SplitLoaders
from mmpeft.data.transforms import TRAIN_CROPS, eval_transform, train_transform

__all__ = ["ImageListDataModule", "ImageList", "read_list"]

LAYOUT = __doc__.split("\n\n", 2)[2].rstrip()


def read_list(path: Path) -> list[tuple[str, int]]:
    """Parse a list file; the path may contain spaces, the label is the last field."""
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<relative/path> <integer label>', got {line!r}")
        items.append((rel, int(label)))
    return items


class ImageList(Dataset):
    def __init__(self, root: Path, items: list[tuple[str, int]], transform, channels: str = "RGB"):
        self.root, self.items, self.transform, self.channels = root, items, transform, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.items[i]
        with Image.open(self.root / rel) as image:
            return self.transform(image.convert(self.channels)), label


class ImageListDataModule(SplitLoaders, pl.LightningDataModule):
    """Images listed in `train_list` / `val_list` / `test_list` under `root`.

    Args:
        root: the dataset folder (see the layout in the module docstring).
        num_classes: head size; by default 1 + the largest label in the training list.
        image_size, mean, std, interpolation: preprocessing, logged with the run's config.
        shots, shot_seed: keep `shots` training images per class (few-shot runs), chosen with `shot_seed`.
        train_crop, crop_scale: training augmentation: "resize" (direct resize, none: VTAB-1k) or
            "random_resized_crop" over `crop_scale` of the area plus flip (CLIP-LoRA); evaluation always
            resizes directly.
    """

    def __init__(
        self,
        root: str,
        train_list: str = "train.txt",
        val_list: str = "val.txt",
        test_list: str | None = "test.txt",
        num_classes: int | None = None,
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 2,
        shots: int | None = None,
        shot_seed: int = 1,
        train_crop: str = "resize",
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train_crop {train_crop!r}; choose one of {TRAIN_CROPS}")
        self.root = Path(root)
        self.lists = {k: v for k, v in (("train", train_list), ("val", val_list), ("test", test_list)) if v}
        self._check_layout()
        self.items = {split: read_list(self.root / name) for split, name in self.lists.items()}
        if shots:  # few-shot: k training images per class, seeded
            keep = k_shot_indices([label for _, label in self.items["train"]], shots, shot_seed)
            self.items["train"] = [self.items["train"][i] for i in keep]
        labels = [label for _, label in self.items["train"]]
        self.num_classes = num_classes or (max(labels) + 1 if labels else 0)
        self._check_labels()

    def _check_layout(self) -> None:
        missing = [name for name in self.lists.values() if not (self.root / name).is_file()]
        if not self.root.is_dir() or missing:
            what = f"folder {str(self.root)!r} does not exist" if not self.root.is_dir() else f"missing {missing}"
            raise FileNotFoundError(f"image-list dataset: {what}. Expected layout:\n{LAYOUT}")

    def _check_labels(self) -> None:
        for split, items in self.items.items():
            bad = [label for _, label in items if not 0 <= label < self.num_classes]
            if bad:
                raise ValueError(f"{split} list has labels outside [0, {self.num_classes}): e.g. {bad[:3]}")

    def transform(self, split: str):
        """The training crop for "train"; a direct resize for evaluation; normalised."""
        hp = self.hparams
        if split == "train":
            return train_transform(hp.image_size, hp.mean, hp.std, hp.train_crop, hp.crop_scale, hp.interpolation)
        return eval_transform(hp.image_size, hp.mean, hp.std, "resize", interpolation=hp.interpolation)

    def dataset(self, split: str) -> ImageList:
        if split not in self.items:
            raise ValueError(f"this datamodule has no {split!r} split (lists: {self.lists})")
        return ImageList(self.root, self.items[split], self.transform(split))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.dataset(split), batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )  # fmt: skip
