"""FGVC (CUB, NABirds, Flowers, Stanford Dogs, Stanford Cars) with VPT's json split files.

    <root>/train.json  val.json  test.json     each {"relative/path.jpg": label, ...}
    <root>/<image_root>/...                    images/ (CUB, NABirds), Images/ (Dogs), . (Flowers, Cars)

The class map is built once from train.json (sorted label values -> 0..C-1) and shared by every
split, unlike VPT's per-split sort, which shifts labels when a split lacks a class. Protocols: "tune"
(train -> val) and "final" (train + val -> test). For users whose json files are gone,
`make_splits` regenerates the 90/10 train/val split of an official train list, seeded, and writes an
md5 manifest that `verify_splits` checks.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import CheckedImages, Problems, layout_hint
from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.fgvc_files import LAYOUT, PAGE, names_from_class_folders, parse_split, read_split, sorted_labels
from mmpeft.data.image_list import ImageList
from mmpeft.data.metadata import class_names, load_metadata
from mmpeft.data.sampling import split_loader
from mmpeft.data.transforms import TRAIN_CROPS, eval_transform, train_transform

__all__ = [
    "FGVCDataModule", "make_splits", "verify_splits", "read_split", "parse_split", "names_from_class_folders",
    "MANIFEST",
]  # fmt: skip

MANIFEST = "splits.md5"
SPLITS = ("train", "val", "test")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_splits(
    train_items: dict[str, int], test_items: dict[str, int], out_dir: str | Path, val_fraction: float = 0.1,
    seed: int = 42,
) -> dict[str, str]:  # fmt: skip
    """Write train/val/test json from the official train and test lists; returns {file: md5}.

    The val split takes `val_fraction` of the official train list, chosen with `seed` from the sorted
    paths, so the same inputs always give byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(train_items)
    rng = random.Random(seed)
    val = set(rng.sample(paths, round(val_fraction * len(paths))))
    splits = {
        "train": {p: train_items[p] for p in paths if p not in val},
        "val": {p: train_items[p] for p in paths if p in val},
        "test": {p: test_items[p] for p in sorted(test_items)},
    }
    digests = {}
    for name, items in splits.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(items, sort_keys=True, indent=0))
        digests[path.name] = _md5(path)
    (out / MANIFEST).write_text("".join(f"{md5}  {name}\n" for name, md5 in digests.items()))
    return digests


def verify_splits(root: str | Path) -> None:
    """Raise if a split file differs from the md5 manifest written with it."""
    root = Path(root)
    for line in (root / MANIFEST).read_text().splitlines():
        md5, name = line.split()
        if _md5(root / name) != md5:
            raise ValueError(f"{root / name} does not match its md5 in {MANIFEST}: the split file was modified")


class FGVCDataModule(CheckedImages, pl.LightningDataModule):
    """One FGVC dataset from VPT's json splits.

    Training augmentation: `train_crop="resize_crop"` (VPT's: resize to 256, random 224 crop, flip) or
    `"random_resized_crop"` (SSF's `--simple-aug`: RandomResizedCrop over `crop_scale` of the area, flip).
    Evaluation: resize to size / `crop_pct` (VPT 0.875: 256; SSF's timm config 0.9: 248), center crop.
    `mean` / `std` normalise (SSF's in21k ViT uses 0.5 / 0.5). See `mmpeft.data.transforms`.

    The json files and labels are checked when the datamodule is built, the images of the splits in use in
    `setup` (header only; `verify=True` decodes every image, which finds truncated files too); one
    `DataError` names every bad entry.
    """

    layout = LAYOUT
    page = PAGE

    def __init__(
        self,
        root: str,
        dataset: str = "cub",
        protocol: str = "tune",
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        batch_size: int = 64,
        num_workers: int = 4,
        shots: int | None = None,
        shot_seed: int = 1,
        train_crop: str = "resize_crop",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        interpolation: str = "bilinear",
        verify: bool = False,
    ):
        super().__init__()
        if train_crop not in TRAIN_CROPS:
            raise UnknownName(f"unknown train_crop {train_crop!r}; choose one of {TRAIN_CROPS}")
        meta = load_metadata("fgvc")["datasets"]
        if dataset not in meta:
            raise UnknownName(f"unknown FGVC dataset {dataset!r}; datasets: {', '.join(meta)}")
        if protocol not in ("tune", "final"):
            raise UnknownName(f"unknown protocol {protocol!r}; use 'tune' (train -> val) or 'final' (+val -> test)")
        self.save_hyperparameters()
        self.root, self.meta = Path(root), meta[dataset]
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"FGVC {self.meta['name']}: folder {str(self.root)!r} does not exist. {layout_hint(LAYOUT, PAGE)}"
            )
        problems, raw = self.new_problems(), {}
        for split in SPLITS:  # all three are read (and their labels checked) whatever the protocol
            found = len(problems)
            raw[split] = parse_split(self.root / f"{split}.json", problems, f"{split}.json")
            if not raw[split] and len(problems) == found and split in self.splits_in_use:
                problems.add("empty splits", f"{split}.json", f"the {split} split lists no images")
        self.class_map = {label: i for i, label in enumerate(sorted_labels(raw["train"]))}
        if not raw["train"]:  # unreadable or empty (named above): no class map to check the other labels against
            raw = dict.fromkeys(SPLITS, {})
        self.items = {split: self._remap(split, items, problems) for split, items in raw.items()}
        self.num_classes = len(self.class_map)
        if raw["train"] and self.num_classes != self.meta["classes"]:
            problems.add(
                "class counts that differ from the dataset's", "train.json",
                f"has {self.num_classes} classes, {self.meta['name']} has {self.meta['classes']}: another dataset's "
                "split files?",
            )  # fmt: skip
        self.raise_with_images(problems)  # one error for bad json, labels and images alike
        if shots:  # few-shot: k training images per class, seeded
            keep = k_shot_indices([label for _, label in self.items["train"]], shots, shot_seed)
            self.items["train"] = [self.items["train"][i] for i in keep]

    @property
    def splits_in_use(self) -> tuple[str, ...]:
        """The "tune" protocol trains on train and validates on val; "final" adds val to training, tests on test."""
        return ("train", "val") if self.hparams.protocol == "tune" else SPLITS

    def new_problems(self) -> Problems:
        return Problems(f"FGVC {self.meta['name']} ({self.hparams.protocol} protocol) at {self.root}")

    def image_entries(self) -> tuple[Path, list[tuple[str, str]]]:
        """Every image the splits in use list (the training list after any k-shot cut), with its json file."""
        entries = [(rel, f"{split}.json") for split in self.splits_in_use for rel, _ in self.items[split]]
        return self.root / self.meta["image_root"], entries

    @property
    def class_names(self) -> list[str]:
        """Names in label order (for CLIP heads); NABirds reads them from `<root>/classes.txt`."""
        return class_names("fgvc", self.hparams.dataset, self.root)

    def _remap(self, split: str, items: dict, problems: Problems) -> list[tuple[str, int]]:
        """(path, class index) of every entry; each label that train.json lacks is added to `problems`."""
        remapped = []
        for path, label in items.items():
            if label in self.class_map:
                remapped.append((path, self.class_map[label]))
            else:
                problems.add("labels that train.json lacks", f"{split}.json[{json.dumps(path)}]", f"label {label!r}")
        return remapped

    def _images(self, split: str, train: bool) -> ImageList:
        hp = self.hparams
        if train:
            transform = train_transform(hp.image_size, hp.mean, hp.std, hp.train_crop, hp.crop_scale, hp.interpolation)
        else:
            transform = eval_transform(hp.image_size, hp.mean, hp.std, "center_crop", hp.crop_pct, hp.interpolation)
        return ImageList(self.root / self.meta["image_root"], self.items[split], transform)

    @property
    def has_test_split(self) -> bool:
        return self.hparams.protocol == "final"

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return split_loader(dataset, hp.batch_size, shuffle, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data import ConcatDataset

        splits = ["train"] if self.hparams.protocol == "tune" else ["train", "val"]
        return self._loader(ConcatDataset([self._images(s, train=True) for s in splits]), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._images("val", train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.protocol == "tune":
            raise ValueError("the 'tune' protocol has no test split (selection uses val); use protocol='final'")
        return self._loader(self._images("test", train=False), shuffle=False)
