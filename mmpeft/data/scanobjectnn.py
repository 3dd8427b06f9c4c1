"""ScanObjectNN (15 classes) from the official h5 files, read as the official repositories read them
(the shared resampling, protocols and voting: `mmpeft.data.point_clouds`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import NON_FINITE, DataError, Problems
from mmpeft.data.point_clouds import PointDataModule, fps_prefix
from mmpeft.data.point_transforms import (
    center,
    normalize_unit_sphere,
)

__all__ = [
    "SCANOBJECTNN_CLASSES",
    "SCANOBJECTNN_FILES",
    "SCANOBJECTNN_LAYOUT",
    "ScanObjectNNDataModule",
    "read_scanobjectnn_h5",
]

SCANOBJECTNN_FILES = {
    "OBJ_BG": ("main_split/training_objectdataset.h5", "main_split/test_objectdataset.h5"),
    "OBJ_ONLY": ("main_split_nobg/training_objectdataset.h5", "main_split_nobg/test_objectdataset.h5"),
    "PB_T50_RS": (
        "main_split/training_objectdataset_augmentedrot_scale75.h5",
        "main_split/test_objectdataset_augmentedrot_scale75.h5",
    ),
}
SCANOBJECTNN_CLASSES = [
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed", "pillow", "sink",
    "sofa", "toilet",
]  # fmt: skip

SCANOBJECTNN_LAYOUT = """\
    <root>/main_split/training_objectdataset.h5                           OBJ_BG
    <root>/main_split/test_objectdataset.h5
    <root>/main_split_nobg/training_objectdataset.h5                      OBJ_ONLY
    <root>/main_split_nobg/test_objectdataset.h5
    <root>/main_split/training_objectdataset_augmentedrot_scale75.h5      PB_T50_RS
    <root>/main_split/test_objectdataset_augmentedrot_scale75.h5
    each h5: `data` float32 [n, 2048, 3], `label` int [n] (an extra `mask` is ignored);
    <root> is the `h5_files` folder of the ScanObjectNN download (data/ScanObjectNN in Point-MAE)"""


# -- ScanObjectNN -------------------------------------------------------------------------------------------------
def read_scanobjectnn_h5(path: Path, num_classes: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """(`data` float32 [n, P, 3], `label` int64 [n]) of an official ScanObjectNN h5 file, checked."""
    import h5py

    expected = f"expected `data` float [n, P, 3] and `label` int [n] with labels in [0, {num_classes})"
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in ("data", "label") if key not in file or not isinstance(file[key], h5py.Dataset)]
            if missing:
                found = sorted(file)
                raise DataError(f"ScanObjectNN file {path} lacks the keys {missing} (it has {found}); {expected}")
            data, label = file["data"][()], file["label"][()]
    except OSError as err:
        raise DataError(f"ScanObjectNN file {path} is not a readable h5 file ({err}); {expected}") from err
    if data.ndim != 3 or data.shape[-1] != 3 or data.dtype.kind != "f" or not len(data):
        raise DataError(f"ScanObjectNN file {path}: `data` is {data.dtype} {list(data.shape)}; {expected}")
    if label.ndim == 2 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 1 or label.dtype.kind not in "iu" or len(label) != len(data):
        raise DataError(
            f"ScanObjectNN file {path}: `label` is {label.dtype} {list(label.shape)} for {len(data)} clouds; {expected}"
        )
    if label.min() < 0 or label.max() >= num_classes:
        raise DataError(f"ScanObjectNN file {path}: labels span [{label.min()}, {label.max()}]; {expected}")
    problems = Problems(f"ScanObjectNN file {path}")
    for i in np.flatnonzero(~np.isfinite(data).all(axis=(1, 2))):
        bad_points = int((~np.isfinite(data[i])).any(axis=1).sum())
        problems.add(NON_FINITE, f"data[{i}]", f"{bad_points} points with NaN or inf")
    problems.raise_if_any()
    return data.astype(np.float32, copy=False), label.astype(np.int64)


class ScanObjectNNDataModule(PointDataModule):
    """ScanObjectNN (15 classes) from the official h5 files of one variant (file names in `SCANOBJECTNN_LAYOUT`).

    Args:
        root: the folder holding `main_split/` and `main_split_nobg/`.
        variant: "PB_T50_RS" (the hardest, 11,416 / 2,882), "OBJ_BG" or "OBJ_ONLY" (2,309 / 581).
        num_points: points per cloud (2048: Point-MAE / Point-PEFT; Any2Point uses 1024).
        protocol: "final" (validation carved from train, test once) or "paper" (validation = test; warns).
        val_fraction, seed: the stratified validation carve of "final"; `seed` also seeds the votes.
        augment: training augmentation, "scale_translate" (Point-MAE), "rotate" (Point-PEFT -aug, `RotateUp`),
            "none"; training clouds are subset and shuffled whatever it is.
        normalize: "none" (the h5 clouds as they are, as Point-MAE / Point-PEFT), "center" (Any2Point) or
            "unit_sphere" (centre and divide by the max norm).
        votes, vote_augment: test-time voting (see the module docstring).
        shots: keep k training clouds per class (seeded).
        drop_last: drop the last partial training batch each epoch, as Point-MAE's and Point-BERT's training
            loaders do (`drop_last=True` in their dataset builder); it also keeps a batch of one away from the
            MLP head's BatchNorm. False keeps every cloud (a final batch of one joins the batch before it).
    """

    num_classes = 15
    class_names = SCANOBJECTNN_CLASSES
    layout = SCANOBJECTNN_LAYOUT
    page = "scanobjectnn.md"

    def __init__(
        self,
        root: str,
        variant: str = "PB_T50_RS",
        num_points: int = 2048,
        protocol: str = "final",
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "scale_translate",
        normalize: str = "none",
        votes: int = 1,
        vote_augment: str = "scale_translate",
        shots: int | None = None,
        drop_last: bool = True,
    ):
        super().__init__()
        if variant not in SCANOBJECTNN_FILES:
            raise UnknownName(f"unknown ScanObjectNN variant {variant!r}; choose one of {list(SCANOBJECTNN_FILES)}")
        if normalize not in ("none", "center", "unit_sphere"):
            raise UnknownName(f"unknown normalize {normalize!r}; choose 'none', 'center' or 'unit_sphere'")
        self.save_hyperparameters()
        self.title = f"ScanObjectNN {variant}"
        self._check_args()
        self.root = Path(root)
        if not self.root.is_dir():
            raise self._missing(f"folder {str(self.root)!r} does not exist")
        self.files = {split: self.root / name for split, name in zip(("train", "test"), SCANOBJECTNN_FILES[variant])}
        missing = [str(path) for path in self.files.values() if not path.is_file()]
        if missing:
            raise self._missing(f"missing {missing}")

    def _load(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        data, labels = read_scanobjectnn_h5(self.files[split], self.num_classes)
        points = torch.from_numpy(data)
        if self.hparams.normalize == "center":
            points = center(points)
        elif self.hparams.normalize == "unit_sphere":
            points = normalize_unit_sphere(points)
        return fps_prefix(points, keep, self.hparams.num_points, fps_ordered=False), torch.from_numpy(labels)
