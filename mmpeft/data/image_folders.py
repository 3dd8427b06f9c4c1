"""Diffusion fine-tuning data in the layouts diffusers' and the Hub's users already have.

Captioned images, the `imagefolder` layout (`datasets.load_dataset("imagefolder", data_dir=root)` reads the same):

    root/                       or root/train/ and root/validation/ (or val/), each like this
      metadata.jsonl            {"file_name": "0001.png", "text": "a red bird on a branch"} per line
      0001.png ...

Class-conditional images (a DiT with a fresh class table), one sub-folder per class:

    root/train/<class name>/*.png      root/val/<class name>/*.png (optional)

Images are resized on the short side, cropped (centre or random) and optionally flipped, in [-1, 1]
(`diffusion_transform`). Batches are (images, captions) or (images, labels). Without a validation folder,
`val_count` training images spread over the split (centre-cropped, unflipped) are the validation split: the task
scores them with fixed noise, a loss that tracks the fit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmpeft.data.checks import DataError
from mmpeft.data.dreambooth import IMAGE_SUFFIXES, image_files
from mmpeft.data.image_list import open_image
from mmpeft.data.sampling import split_loader
from mmpeft.data.transforms import diffusion_transform

__all__ = ["CaptionedImagesDataModule", "ClassFolderDataModule", "read_metadata"]

VAL_FOLDERS = ("validation", "val")


def read_metadata(folder: Path, image_column: str, caption_column: str) -> list[tuple[Path, str]]:
    """(image path, caption) of every line of `folder/metadata.jsonl`; one `DataError` naming every bad line."""
    path = folder / "metadata.jsonl"
    problems, items = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {n}: not JSON ({err.msg})")
            continue
        missing = [c for c in (image_column, caption_column) if c not in row]
        if missing:
            problems.append(f"line {n}: no {', '.join(map(repr, missing))} (it has {', '.join(map(repr, row))})")
            continue
        image = folder / str(row[image_column])
        if not image.is_file():
            problems.append(f"line {n}: {row[image_column]!r} is not a file in {folder}")
            continue
        items.append((image, str(row[caption_column])))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise DataError(
            f"{path}: {shown}. Each line is a JSON object with the image's file name (relative to the folder) "
            f"under {image_column!r} and its caption under {caption_column!r} (set image_column / caption_column)"
        )
    if not items:
        raise DataError(f"{path} lists no images")
    return items


class _Images(Dataset):
    """(image, its caption or label); a caption is dropped (replaced by "") with probability `dropout`."""

    def __init__(self, items: list[tuple[Path, Any]], transform, dropout: float = 0.0):
        self.items, self.transform, self.dropout = items, transform, dropout

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        path, cond = self.items[i]
        pixels = self.transform(open_image(path, fix="fix it or remove its line from metadata.jsonl / its folder"))
        if self.dropout and random.random() < self.dropout:  # seeded per item by the training loader
            cond = ""
        return pixels, cond


class _FolderData(pl.LightningDataModule):
    """What both layouts share: the transforms, the loaders, the validation split."""

    def __init__(self, root: str, image_size: int, center_crop: bool, random_flip: bool, val_count: int,
                 batch_size: int, num_workers: int):  # fmt: skip
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"root {str(self.root)!r} is not a folder")
        self.image_size, self.center_crop, self.random_flip = image_size, center_crop, random_flip
        self.val_count, self.batch_size, self.num_workers = val_count, batch_size, num_workers
        self.items: dict[str, list[tuple[Path, Any]]] = {}

    def _val_from_train(self) -> None:
        if "val" not in self.items and self.val_count:  # spread over the training images (every class)
            train = self.items["train"]
            self.items["val"] = train[:: max(1, len(train) // self.val_count)][: self.val_count]

    def train_dataset(self) -> Dataset:
        transform = diffusion_transform(self.image_size, self.center_crop, self.random_flip)
        return _Images(self.items["train"], transform)

    def train_dataloader(self) -> DataLoader:
        return split_loader(self.train_dataset(), self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.items.get("val"):
            return []
        data = _Images(self.items["val"], diffusion_transform(self.image_size, True, False))
        return split_loader(data, self.batch_size, shuffle=False, num_workers=self.num_workers)


class CaptionedImagesDataModule(_FolderData):
    """Images with a caption each, in the `imagefolder` layout (see the module docstring).

    Args:
        root: the folder holding `metadata.jsonl` (or `train/` and `validation/` folders holding one each).
        image_column / caption_column: the metadata keys of the image's file name and its caption.
        template: a prompt built from each caption, e.g. "a photo of {}" (default: the caption itself).
        caption_dropout: the share of training captions replaced by "" (classifier-free guidance learns the
            unconditional prediction from them; diffusers' scripts: about 0.1). Off by default.
        image_size, center_crop, random_flip: the training preprocessing (short-side resize, crop, flip).
        val_count: without a validation folder, `val_count` training images are the validation split.
    """

    def __init__(
        self,
        root: str,
        image_column: str = "file_name",
        caption_column: str = "text",
        template: str | None = None,
        caption_dropout: float = 0.0,
        image_size: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        val_count: int = 4,
        batch_size: int = 4,
        num_workers: int = 0,
    ):
        super().__init__(root, image_size, center_crop, random_flip, val_count, batch_size, num_workers)
        self.save_hyperparameters()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1), got {caption_dropout}")
        if template is not None and "{}" not in template:
            raise ValueError(f"template must hold '{{}}' where the caption goes, got {template!r}")
        self.num_classes = None
        train = self.root / "train" if (self.root / "train" / "metadata.jsonl").is_file() else self.root
        if not (train / "metadata.jsonl").is_file():
            raise DataError(
                f"no metadata.jsonl in {str(self.root)!r} or its train/ folder; the captioned layout is "
                f'root/metadata.jsonl with lines such as {{"file_name": "0001.png", "text": "a caption"}}'
            )
        self.items["train"] = self._read(train)
        for name in VAL_FOLDERS:
            if (self.root / name / "metadata.jsonl").is_file():
                self.items["val"] = self._read(self.root / name)
                break
        self._val_from_train()

    def _read(self, folder: Path) -> list[tuple[Path, str]]:
        hp = self.hparams
        items = read_metadata(folder, hp.image_column, hp.caption_column)
        return [(path, hp.template.format(caption) if hp.template else caption) for path, caption in items]

    def train_dataset(self) -> Dataset:
        transform = diffusion_transform(self.image_size, self.center_crop, self.random_flip)
        return _Images(self.items["train"], transform, self.hparams.caption_dropout)

    def sample_prompts(self, count: int = 2) -> list[str]:
        """What validation grids sample by default: the first `count` distinct validation (or training) captions."""
        captions = [c for _, c in self.items.get("val") or self.items["train"]]
        return list(dict.fromkeys(captions))[:count]


class ClassFolderDataModule(_FolderData):
    """Class-conditional images, one sub-folder per class (`root/train/<class>/`, optional `root/val/<class>/`);
    labels are the sorted training class names' positions (`classes`), the class count is `num_classes` (give the
    DiT a fresh class table of that size: `--model.init_args.backbone.init_args.num_classes`)."""

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        center_crop: bool = True,
        random_flip: bool = True,
        val_count: int = 4,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__(root, image_size, center_crop, random_flip, val_count, batch_size, num_workers)
        self.save_hyperparameters()
        train = self.root / "train"
        folders = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
        if not folders:
            raise DataError(
                f"no class folders in {str(train)!r}; the layout is root/train/<class name>/*.png (one folder per "
                f"class, images {', '.join(IMAGE_SUFFIXES)})"
            )
        self.classes = [p.name for p in folders]
        self.num_classes = len(self.classes)
        self.items["train"] = self._read(train)
        if (self.root / "val").is_dir():
            self.items["val"] = self._read(self.root / "val")
        self._val_from_train()

    def _read(self, split: Path) -> list[tuple[Path, int]]:
        items, empty = [], []
        for label, name in enumerate(self.classes):
            files = image_files(split / name) if (split / name).is_dir() else []
            empty += [] if files or split.name != "train" else [name]
            items += [(f, label) for f in files]
        unknown = sorted(p.name for p in split.iterdir() if p.is_dir() and p.name not in self.classes)
        if empty or unknown:
            raise DataError(
                f"{split}: " + "; ".join(
                    ([f"class folders without images: {empty}"] if empty else [])
                    + ([f"class folders not in train/: {unknown}"] if unknown else [])
                )
            )  # fmt: skip
        return items
