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
from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.image_list import ImageList
from mmpeft.data.metadata import class_names, load_metadata
from mmpeft.data.transforms import TRAIN_CROPS, eval_transform, train_transform

__all__ = ["FGVCDataModule", "make_splits", "verify_splits", "read_split", "names_from_class_folders", "MANIFEST"]

MANIFEST = "splits.md5"
SPLITS = ("train", "val", "test")
LAYOUT = __doc__.split("\n\n")[1]


def read_split(path: Path) -> dict[str, int | str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"FGVC split file {path} is missing. Expected layout:\n{LAYOUT}\n"
            "Regenerate lost splits with scripts/make_fgvc_splits.py"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold one JSON object mapping image paths to labels")
    return data


def sorted_labels(train: dict[str, int | str]) -> list[int | str]:
    """The label values of train.json in class-index order (the class map every split shares)."""
    return sorted(set(train.values()))


def _read_class_file(path: Path) -> dict[int, str]:
    """`<id> <name>` lines, NABirds' classes.txt format (ids of the whole 1,011-node hierarchy)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: it ships with the dataset download (NABirds: nabirds.tar.gz has classes.txt "
            "next to images/); copy it next to train.json"
        )
    names = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            class_id, _, name = line.strip().partition(" ")
            if not class_id.isdigit() or not name:
                raise ValueError(f"{path}:{number}: expected '<class id> <name>', got {line!r}")
            names[int(class_id)] = name.strip()
    return names


def names_from_class_folders(root: Path, class_file: str) -> list[str]:
    """Names in label order from `<root>/<class_file>`, each train.json label mapped through its image folder.

    NABirds' classes.txt names every node of its hierarchy; an image's class is the folder it sits in
    (`images/0817/<uuid>.jpg` -> class 817). That holds whatever the json's label values are (class ids or
    0-based indices), and never yields an internal hierarchy node.
    """
    names = _read_class_file(root / class_file)
    train = read_split(root / "train.json")
    folders: dict[int | str, set[str]] = {}
    for path, label in train.items():
        folders.setdefault(label, set()).add(Path(path).parent.name)
    result = []
    for label in sorted_labels(train):
        (folder, *others) = sorted(folders[label])
        if others or not folder.isdigit() or int(folder) not in names:
            raise ValueError(
                f"{root / 'train.json'}: label {label!r} lies in folders {sorted(folders[label])[:3]}; expected one "
                f"numbered class folder listed in {class_file} (images/<class id>/<file>.jpg)"
            )
        result.append(names[int(folder)])
    return result


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


class FGVCDataModule(pl.LightningDataModule):
    """One FGVC dataset from VPT's json splits.

    Training augmentation: `train_crop="resize_crop"` (VPT's: resize to 256, random 224 crop, flip) or
    `"random_resized_crop"` (SSF's `--simple-aug`: RandomResizedCrop over `crop_scale` of the area, flip).
    Evaluation: resize to size / `crop_pct` (VPT 0.875: 256; SSF's timm config 0.9: 248), center crop.
    `mean` / `std` normalise (SSF's in21k ViT uses 0.5 / 0.5). See `mmpeft.data.transforms`.
    """

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
            raise FileNotFoundError(f"FGVC folder {str(self.root)!r} does not exist. Expected layout:\n{LAYOUT}")
        raw = {split: read_split(self.root / f"{split}.json") for split in SPLITS}
        self.class_map = {label: i for i, label in enumerate(sorted_labels(raw["train"]))}
        self.items = {split: self._remap(split, items) for split, items in raw.items()}
        if shots:  # few-shot: k training images per class, seeded
            keep = k_shot_indices([label for _, label in self.items["train"]], shots, shot_seed)
            self.items["train"] = [self.items["train"][i] for i in keep]
        self.num_classes = len(self.class_map)
        if self.num_classes != self.meta["classes"]:
            raise ValueError(
                f"{self.root / 'train.json'} has {self.num_classes} classes, {self.meta['name']} has "
                f"{self.meta['classes']}: another dataset's split files?"
            )

    @property
    def class_names(self) -> list[str]:
        """Names in label order (for CLIP heads); NABirds reads them from `<root>/classes.txt`."""
        return class_names("fgvc", self.hparams.dataset, self.root)

    def _remap(self, split: str, items: dict) -> list[tuple[str, int]]:
        unknown = sorted({str(v) for v in items.values() if v not in self.class_map})
        if unknown:
            raise ValueError(f"{split}.json has labels that train.json lacks: {unknown[:5]}")
        return [(path, self.class_map[label]) for path, label in items.items()]

    def _images(self, split: str, train: bool) -> ImageList:
        hp = self.hparams
        if train:
            transform = train_transform(hp.image_size, hp.mean, hp.std, hp.train_crop, hp.crop_scale, hp.interpolation)
        else:
            transform = eval_transform(hp.image_size, hp.mean, hp.std, "center_crop", hp.crop_pct, hp.interpolation)
        return ImageList(self.root / self.meta["image_root"], self.items[split], transform)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data import ConcatDataset  # noqa: PLC0415

        splits = ["train"] if self.hparams.protocol == "tune" else ["train", "val"]
        return self._loader(ConcatDataset([self._images(s, train=True) for s in splits]), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._images("val", train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.protocol == "tune":
            raise ValueError("the 'tune' protocol has no test split (selection uses val); use protocol='final'")
        return self._loader(self._images("test", train=False), shuffle=False)
