"""ModelNet40 from Point-BERT's pickles (read through the restricted `mmpeft.data.safe_pickle`) or the raw txt
files (the shared resampling, protocols and voting: `mmpeft.data.point_clouds`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import NON_FINITE, DataError, Problems, layout_hint
from mmpeft.data.point_clouds import PointDataModule, fps_prefix
from mmpeft.data.point_transforms import (
    normalize_unit_sphere,
)
from mmpeft.data.safe_pickle import ArrayUnpickler

__all__ = ["MODELNET40_CLASSES", "MODELNET40_LAYOUT", "PICKLE_FORMAT", "ModelNet40DataModule", "load_modelnet_pickle"]

MODELNET40_CLASSES = [
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup", "curtain",
    "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop", "mantel", "monitor",
    "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool", "table",
    "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
]  # fmt: skip


MODELNET40_LAYOUT = """\
    layout "pickle" (Point-BERT / Point-MAE):
    <root>/modelnet40_train_8192pts_fps.dat    pickle of [list of 8192x6 float32 arrays, list of int32 (1,) labels]
    <root>/modelnet40_test_8192pts_fps.dat
    <root>/modelnet40_shape_names.txt          optional here: the 40 class names, one a line
    layout "txt" (modelnet40_normal_resampled):
    <root>/modelnet40_shape_names.txt          the 40 class names, one a line (label = line number)
    <root>/modelnet40_train.txt                shape ids, one a line, e.g. airplane_0001
    <root>/modelnet40_test.txt
    <root>/<class>/<shape id>.txt              e.g. airplane/airplane_0001.txt: lines "x,y,z,nx,ny,nz"
    <root> is modelnet40_normal_resampled/ (data/ModelNet/modelnet40_normal_resampled in Point-MAE)"""


PICKLE_FORMAT = "[list of P x 6 float32 arrays, list of int32 (1,) label arrays] of equal length"


def load_modelnet_pickle(path: Path, num_classes: int = 40) -> tuple[list[np.ndarray], np.ndarray]:
    """(clouds, labels [n] int64) of a Point-BERT ModelNet40 pickle, through `ArrayUnpickler`, then checked."""
    try:
        with open(path, "rb") as file:
            content = ArrayUnpickler(file, path).load()
    except DataError:
        raise
    except Exception as err:  # truncated or foreign files raise anything from EOFError to TypeError
        raise DataError(f"cannot unpickle {path} ({type(err).__name__}: {err}); expected {PICKLE_FORMAT}") from err
    if not isinstance(content, list | tuple) or len(content) != 2:
        what = f"a {len(content)}-item {type(content).__name__}" if isinstance(content, list | tuple) else None
        raise DataError(f"{path} holds {what or f'a {type(content).__name__}'}; expected {PICKLE_FORMAT}")
    clouds, labels = content
    if not isinstance(clouds, list | tuple) or not isinstance(labels, list | tuple):
        raise DataError(f"{path} holds [{type(clouds).__name__}, {type(labels).__name__}]; expected {PICKLE_FORMAT}")
    if len(clouds) != len(labels) or not clouds:
        raise DataError(f"{path} holds {len(clouds)} clouds and {len(labels)} labels; expected {PICKLE_FORMAT}")
    problems = Problems(f"ModelNet40 pickle {path}")
    values = np.zeros(len(labels), dtype=np.int64)
    for i, (cloud, label) in enumerate(zip(clouds, labels)):
        if not isinstance(cloud, np.ndarray) or cloud.dtype.kind != "f" or cloud.ndim != 2 or cloud.shape[1] < 3:
            what = f"{cloud.dtype} array {list(cloud.shape)}" if isinstance(cloud, np.ndarray) else type(cloud).__name__
            problems.add("clouds that are not float [P, 6] arrays", f"clouds[{i}]", what)
        if isinstance(label, np.ndarray) and label.dtype.kind in "iu" and label.size == 1:
            values[i] = int(label.reshape(()))
        elif isinstance(label, int | np.integer) and not isinstance(label, bool):
            values[i] = int(label)
        else:
            what = f"{label.dtype} array {list(label.shape)}" if isinstance(label, np.ndarray) else repr(label)[:40]
            problems.add("labels that are not integer (1,) arrays", f"labels[{i}]", what)
            continue
        if not 0 <= values[i] < num_classes:
            problems.add(f"labels outside [0, {num_classes})", f"labels[{i}]", str(values[i]))
    problems.raise_if_any(f"Expected {PICKLE_FORMAT}")
    return list(clouds), values


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ModelNet40DataModule(PointDataModule):
    """ModelNet40 (40 classes, 9,843 / 2,468 shapes) from Point-BERT's FPS pickles or the raw txt files.

    Loading keeps xyz (plus the normals with `use_normals`), centres every cloud and divides it by its largest
    norm, over all the points the file holds (8,192 in a pickle, as Point-MAE; 10,000 in a txt file), then cuts it
    to FPS order (the pickles are FPS-ordered already; txt clouds are ordered by `farthest_point_order` when loaded).

    Args:
        root: the `modelnet40_normal_resampled` folder (see `MODELNET40_LAYOUT`).
        layout: "pickle", "txt", or "auto" (the pickles when both are there, else the txt files).
        num_points: points per cloud (1024 in every official config).
        use_normals: clouds [N, 6] with the normals (rotated along with the points, never rescaled).
        protocol, val_fraction, seed, augment, votes, vote_augment, shots, drop_last: as `ScanObjectNNDataModule`.
    """

    num_classes = 40
    layout = MODELNET40_LAYOUT
    page = "modelnet40.md"
    title = "ModelNet40"

    def __init__(
        self,
        root: str,
        layout: str = "auto",
        num_points: int = 1024,
        use_normals: bool = False,
        protocol: str = "final",
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "scale_translate",
        votes: int = 1,
        vote_augment: str = "scale_translate",
        shots: int | None = None,
        drop_last: bool = True,
    ):
        super().__init__()
        if layout not in ("auto", "pickle", "txt"):
            raise UnknownName(f"unknown ModelNet40 layout {layout!r}; choose 'auto', 'pickle' or 'txt'")
        self.save_hyperparameters()
        self._check_args()
        self.root = Path(root)
        if not self.root.is_dir():
            raise self._missing(f"folder {str(self.root)!r} does not exist")
        pickles = {s: self.root / f"modelnet40_{s}_8192pts_fps.dat" for s in ("train", "test")}
        lists = {s: self.root / f"modelnet40_{s}.txt" for s in ("train", "test")}
        names = self.root / "modelnet40_shape_names.txt"
        if layout == "auto":
            layout = "pickle" if all(p.is_file() for p in pickles.values()) else "txt"
        self.resolved_layout = layout
        needed = list(pickles.values()) if layout == "pickle" else [names, *lists.values()]
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            found = "neither the pickles nor the txt lists" if self.hparams.layout == "auto" else f"the {layout} layout"
            raise self._missing(f"missing {missing} (found {found})")
        self.files = pickles if layout == "pickle" else lists
        self.class_names = self._class_names(names)

    def _class_names(self, path: Path) -> list[str]:
        """modelnet40_shape_names.txt when present (always with txt files), else ModelNet40's sorted names."""
        if not path.is_file():
            return list(MODELNET40_CLASSES)
        names = _read_lines(path)
        if len(names) != self.num_classes or len(set(names)) != len(names):
            raise DataError(f"{path} lists {len(names)} distinct names of {len(names)}; expected the 40 ModelNet40 "
                            f"classes, one a line. {layout_hint(self.layout, self.page)}")  # fmt: skip
        return names

    def _columns(self) -> int:
        return 6 if self.hparams.use_normals else 3

    @property
    def point_channels(self) -> int:
        return self._columns()

    def _normalized(self, cloud: np.ndarray, where: str, problems: Problems) -> torch.Tensor | None:
        if cloud.shape[1] < self._columns():
            problems.add(f"clouds with fewer than {self._columns()} columns", where, f"shape {list(cloud.shape)}")
            return None
        bad = ~np.isfinite(np.asarray(cloud[:, : self._columns()], dtype=np.float64)).all(axis=1)
        if bad.any():
            problems.add(NON_FINITE, where, f"{int(bad.sum())} points with NaN or inf")
            return None
        if cloud.shape[0] < self.hparams.num_points:
            problems.add(f"clouds with fewer than num_points={self.hparams.num_points} points", where,
                         f"{cloud.shape[0]} points")  # fmt: skip
            return None
        return normalize_unit_sphere(torch.from_numpy(np.asarray(cloud[:, : self._columns()], dtype=np.float32)))

    def _load(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load_pickle(split, keep) if self.resolved_layout == "pickle" else self._load_txt(split, keep)

    def _load_pickle(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[split]
        clouds, labels = load_modelnet_pickle(path, self.num_classes)
        problems = Problems(f"ModelNet40 pickle {path}")
        keep = min([keep] + [len(cloud) for cloud in clouds])
        kept = []
        for i in range(len(clouds)):
            cloud, clouds[i] = clouds[i], None  # free each 8192-point array once it is cut
            tensor = self._normalized(cloud, f"clouds[{i}]", problems)
            kept.append(None if tensor is None else tensor[:keep].clone())  # already in FPS order
        problems.raise_if_any()
        return torch.stack(kept), torch.from_numpy(labels)

    def _load_txt(self, split: str, keep: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Each listed shape's file, normalised, then FPS-ordered in chunks of equal-size clouds."""
        listing = self.files[split]
        index = {name: i for i, name in enumerate(self.class_names)}
        problems = Problems(f"ModelNet40 txt split {listing}")
        clouds, labels = [], []
        for number, shape_id in enumerate(_read_lines(listing), 1):
            where = f"{listing.name}:{number}"
            class_name = shape_id.rsplit("_", 1)[0]
            if class_name not in index:
                problems.add("shape ids of unknown classes", where, f"{shape_id!r}: no class {class_name!r}")
                continue
            path = self.root / class_name / f"{shape_id}.txt"
            try:
                cloud = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
            except FileNotFoundError:
                problems.add("missing shape files", f"{path} ({where})")
                continue
            except ValueError as err:
                problems.add("unreadable shape files", f"{path} ({where})", f"{err}; expected lines 'x,y,z,nx,ny,nz'")
                continue
            tensor = self._normalized(cloud, f"{path} ({where})", problems)
            if tensor is not None:
                clouds.append(tensor)
                labels.append(index[class_name])
        if not clouds:
            problems.add("empty splits", str(listing), "lists no shapes")
        problems.raise_if_any(f"Expected layout:\n{self.layout}")
        keep = min([keep] + [len(cloud) for cloud in clouds])
        points = torch.empty(len(clouds), keep, clouds[0].shape[1])
        for start in range(0, len(clouds), chunk):
            part = clouds[start : start + chunk]
            for size in {len(cloud) for cloud in part}:  # FPS batches clouds of one size
                rows = [i for i, cloud in enumerate(part) if len(cloud) == size]
                ordered = fps_prefix(torch.stack([part[i] for i in rows]), keep, self.hparams.num_points, False)
                points[[start + i for i in rows]] = ordered[:, :keep]
        return points, torch.tensor(labels, dtype=torch.int64)
