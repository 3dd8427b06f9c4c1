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

from mmpeft.data.checks import VERIFY_HINT, CheckedImages, DataError, Problems, layout_hint
from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders
from mmpeft.data.transforms import TRAIN_CROPS, eval_transform, train_transform

__all__ = ["ImageListDataModule", "ImageList", "open_image", "read_list", "parse_list"]

LAYOUT = __doc__.split("\n\n", 2)[2].rstrip()
LINE_FORMAT = "'<relative/path> <integer label>'"


def parse_list(path: Path, problems: Problems, name: str | None = None) -> tuple[list[tuple[str, int, int]], int]:
    """(relative path, label, line number) of every well-formed line, and the number of non-blank lines.

    The path may contain spaces, the label is the last field. Each malformed line is added to `problems`
    as `<name>:<line>` (`name` defaults to the path).
    """
    name = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        problems.add("unreadable split files", name, f"not UTF-8 text ({err})")
        return [], 0
    entries, lines = [], 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        lines += 1
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            problems.add("malformed lines", f"{name}:{n}", f"expected {LINE_FORMAT}, got {line!r}")
            continue
        entries.append((rel, int(label), n))
    return entries, lines


def read_list(path: Path) -> list[tuple[str, int]]:
    """Parse a list file; raises one `DataError` naming every malformed line."""
    problems = Problems(f"list file {path}")
    entries, _ = parse_list(path, problems)
    problems.raise_if_any()
    return [(rel, label) for rel, label, _ in entries]


class ImageList(Dataset):
    def __init__(self, root: Path, items: list[tuple[str, int]], transform, channels: str = "RGB"):
        self.root, self.items, self.transform, self.channels = root, items, transform, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.items[i]
        fix = f"fix or remove it from the split file, and {VERIFY_HINT} so every bad image is found at once"
        return self.transform(open_image(self.root / rel, self.channels, fix)), label


def open_image(path: Path, channels: str = "RGB", fix: str = "fix or remove it") -> Image.Image:
    """The decoded image in `channels`; an unreadable file is a `DataError` naming it and `fix`, what to do."""
    try:
        with Image.open(path) as opened:
            return opened.convert(channels)  # decodes the pixels
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image {path} ({type(err).__name__}: {err}); {fix}") from err


class ImageListDataModule(CheckedImages, SplitLoaders, pl.LightningDataModule):
    """Images listed in `train_list` / `val_list` / `test_list` under `root`.

    Args:
        root: the dataset folder (see the layout in the module docstring).
        num_classes: head size; by default 1 + the largest label in the training list.
        image_size, mean, std, interpolation: preprocessing, logged with the run's config.
        shots, shot_seed: keep `shots` training images per class (few-shot runs), chosen with `shot_seed`.
        train_crop, crop_scale: training augmentation: "resize" (direct resize, none: VTAB-1k) or
            "random_resized_crop" over `crop_scale` of the area plus flip (CLIP-LoRA); evaluation always
            resizes directly.
        verify: before training, decode every listed image fully (finds truncated files; slower) instead of
            opening its header only. Either way the split files and labels are checked when the datamodule is
            built, the images in `setup`, and one `DataError` names every bad entry.
    """

    layout = LAYOUT
    page = "image_list.md"

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
        verify: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train_crop {train_crop!r}; choose one of {TRAIN_CROPS}")
        self.root = Path(root)
        self.lists = {k: v for k, v in (("train", train_list), ("val", val_list), ("test", test_list)) if v}
        self._check_layout()
        problems = self.new_problems()
        self.items, self._where, lines = {}, {}, {}  # _where: "<list file>:<line>" of each item
        for split, name in self.lists.items():
            entries, lines[split] = parse_list(self.root / name, problems, name)
            self.items[split] = [(rel, label) for rel, label, _ in entries]
            self._where[split] = [f"{name}:{n}" for *_, n in entries]
        labels = [label for _, label in self.items["train"]]
        self.num_classes = num_classes or (max(labels) + 1 if labels else 0)
        # logged as resolved (not the argument's None), so it agrees with the model's head when Lightning merges them
        self.save_hyperparameters({**self.hparams, "num_classes": self.num_classes})
        self._check_lists(problems, lines)
        self.raise_with_images(problems)  # one error for bad lines, labels and images alike
        if shots:  # few-shot: k training images per class, seeded
            keep = k_shot_indices(labels, shots, shot_seed)
            self.items["train"] = [self.items["train"][i] for i in keep]
            self._where["train"] = [self._where["train"][i] for i in keep]

    def _check_layout(self) -> None:
        """The folder and the split files in use exist; else name them with this dataset's own layout and page."""
        missing = [name for name in self.lists.values() if not (self.root / name).is_file()]
        if not self.root.is_dir() or missing:
            what = f"folder {str(self.root)!r} does not exist" if not self.root.is_dir() else f"missing {missing}"
            subject = self.new_problems().subject
            raise FileNotFoundError(f"{subject}: {what}. {layout_hint(self.layout, self.page)}")

    def new_problems(self) -> Problems:
        return Problems(f"{type(self).__name__} at {self.root}")

    def _check_lists(self, problems: Problems, lines: dict[str, int]) -> None:
        """Every split in use lists images, every label lies in [0, num_classes); `lines`: non-blank lines."""
        for split, name in self.lists.items():
            if not lines[split]:
                problems.add("empty splits", name, f"the {split} split lists no images")
        if not self.num_classes:  # an empty training list and no num_classes: no range to check against
            return
        for split, items in self.items.items():
            for (rel, label), where in zip(items, self._where[split]):
                if not 0 <= label < self.num_classes:
                    problems.add(f"labels outside [0, {self.num_classes})", where, f"label {label} ({rel})")

    def image_entries(self) -> tuple[Path, list[tuple[str, str]]]:
        """Every image the splits list (the training list after any k-shot cut), with where it is listed."""
        entries = []
        for split, items in self.items.items():
            entries += [(rel, where) for (rel, _), where in zip(items, self._where[split])]
        return self.root, entries

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

    @property
    def has_test_split(self) -> bool:
        return "test" in self.lists

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return split_loader(self.dataset(split), hp.batch_size, shuffle, num_workers=hp.num_workers,
                            persistent_workers=hp.num_workers > 0)  # fmt: skip
