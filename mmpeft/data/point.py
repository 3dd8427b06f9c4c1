"""Point-cloud classification: ScanObjectNN (the official h5 files) and ModelNet40 (Point-BERT's pickles or the
raw txt files), read as the official repositories read them.

Batches are `(points [B, N, C], labels [B])`, float32 / int64, C = 3 (xyz) or 6 (xyz + normals, ModelNet40 with
`use_normals`). With `votes=V > 1` the test loader yields `[B, V, N, C]`: V augmented copies of every cloud, each
a fresh random N-of-ceil(1.2 N) subset plus `vote_augment` (Point-MAE's ModelNet40 voting), seeded by (seed, item),
so a task averages the logits of the V passes (`mmpeft.tasks.point.vote_logits`). Validation never votes.

Resampling follows the official "FPS to 1.2 N (capped at the cloud's size), then a random N-subset" for training
and "FPS to N" for evaluation. Clouds are stored in farthest-point order once, when loaded: Point-BERT's pickles
already are (their first k points are the FPS to k), other clouds with more than N points are ordered by
`farthest_point_order` (pure PyTorch, starting at point 0; a one-time cost of about a minute for the full
PB_T50_RS or txt ModelNet40 on CPU). So evaluation takes the first N points and training draws N of the first
ceil(1.2 N) in random order, which is also the per-epoch point shuffle (with N = 2048 on ScanObjectNN's 2048
points it is exactly a shuffle, as in the official code). Each training item's subset and augmentation come from
one generator seeded from torch's RNG, which the loader seeds per (seed, epoch) in workers and the run seeds and
checkpoints in the main process, so a resumed run repeats them.

Neither dataset has a validation split. Protocol "final" (default) carves a class-stratified `val_fraction` of
the official train split (seeded by `seed`) for model selection and evaluates the test split once; protocol
"paper" validates on the test split, as every official repository does, which selects the reported epoch on
the test set: it warns, and `protocol_note` says so for the run log.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import NON_FINITE, DataError, Problems, layout_hint
from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.point_transforms import (
    AUGMENTS,
    Compose,
    PointTransform,
    RandomSubset,
    build_augment,
    center,
    farthest_point_order,
    normalize_unit_sphere,
)
from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders

__all__ = [
    "ScanObjectNNDataModule", "ModelNet40DataModule", "PointClouds", "MissingPointData",
    "stratified_split", "read_scanobjectnn_h5", "load_modelnet_pickle", "SCANOBJECTNN_FILES", "SCANOBJECTNN_CLASSES",
    "MODELNET40_CLASSES", "SCANOBJECTNN_LAYOUT", "MODELNET40_LAYOUT", "PROTOCOLS",
]  # fmt: skip

PROTOCOLS = ("final", "paper")
TRAIN_POOL = 1.2  # official training resampling: FPS to 1.2 N, then a random N-subset

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
MODELNET40_CLASSES = [
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup", "curtain",
    "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop", "mantel", "monitor",
    "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool", "table",
    "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
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


class MissingPointData(DataError, FileNotFoundError):
    """A dataset file or folder is missing (a `DataError` that is also a FileNotFoundError, as fgvc.py raises)."""


# -- the dataset and voting ---------------------------------------------------------------------------------------
class PointClouds(Dataset):
    """Clouds [n, K, C] stored in FPS order (or their file order when K == N) with labels [n].

    No `transform`: the first `num_points` points (evaluation). A `transform` (training: random subset, then the
    augmentation): one copy per item from a generator seeded off torch's RNG. A `transform` and `votes` V: V
    copies [V, N, C] from a generator seeded by (`seed`, item), the same on every pass.
    """

    def __init__(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        num_points: int,
        transform: PointTransform | None = None,
        votes: int | None = None,
        seed: int = 0,
    ):
        self.points, self.labels, self.num_points = points, labels, num_points
        self.transform, self.votes, self.seed = transform, votes, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cloud, label = self.points[i], self.labels[i]
        if self.transform is None:
            return cloud[: self.num_points], label
        if self.votes:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            return torch.stack([self.transform(cloud, generator) for _ in range(self.votes)]), label
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        return self.transform(cloud, generator), label


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices: `fraction` of every class held out (at least one of a class with two or
    more examples), chosen with `seed`."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = round(fraction * len(idx))
        if fraction > 0 and len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held += idx[:n_held].tolist()
        kept += idx[n_held:].tolist()
    return np.sort(np.array(kept, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def _fps_prefix(points: torch.Tensor, keep: int, num_points: int, fps_ordered: bool) -> torch.Tensor:
    """Clouds cut to `keep` points in FPS order; all of them, in file order, when the cloud has just N points."""
    size = points.shape[1]
    if fps_ordered or num_points >= size:
        return points[:, : min(keep, size)].contiguous()
    order = farthest_point_order(points[..., :3], min(keep, size))
    return torch.gather(points, 1, order[..., None].expand(-1, -1, points.shape[-1])).contiguous()


# -- the shared datamodule ----------------------------------------------------------------------------------------
class _PointDataModule(SplitLoaders, pl.LightningDataModule):
    """Protocols, splits, resampling and loaders; a dataset supplies `_load(split, keep)`."""

    num_classes: int
    layout: str = ""
    page: str = "README.md"  # its file in the repository's datasets/ folder
    title: str = ""

    def _check_args(self) -> None:
        hp = self.hparams
        if hp.protocol not in PROTOCOLS:
            raise UnknownName(
                f"unknown protocol {hp.protocol!r}; use 'final' (validation carved from train, test once) or "
                "'paper' (validation = the test split, as the papers)"
            )
        for name in ("augment", "vote_augment"):
            if hp[name] not in AUGMENTS:
                raise UnknownName(f"unknown {name} {hp[name]!r}; choose one of {AUGMENTS}")
        if not 0 < hp.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {hp.val_fraction}")
        if hp.num_points < 1 or hp.votes < 1:
            raise ValueError(f"num_points and votes must be positive, got {hp.num_points} and {hp.votes}")
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = 0
        self.protocol_note: str | None = None  # set only when selection sees the test set: a task warns with it
        if hp.protocol == "paper":
            self.protocol_note = (
                f"{self.title} protocol 'paper': validation IS THE TEST SPLIT, as in the official code, so model "
                "selection (best checkpoint, early stopping, sweeps) sees the test set and the reported accuracy is "
                "optimistic; use protocol='final' for a held-out estimate"
            )
            warnings.warn(self.protocol_note, UserWarning, stacklevel=3)

    @property
    def has_test_split(self) -> bool:
        return True

    @property
    def num_points(self) -> int:
        """Points per cloud in every batch (what a backbone's grouping must fit)."""
        return int(self.hparams.num_points)

    @property
    def point_channels(self) -> int:
        """Channels per point in every batch: 3 (xyz), 6 with normals."""
        return 3

    def _load(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clouds [n, K, C] float32 cut to `keep` points as `_fps_prefix` does, labels [n] int64) of a split."""
        raise NotImplementedError

    def _checked(self, split: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        points, labels = self._load(split, keep)
        if points.shape[1] < self.hparams.num_points:
            raise DataError(
                f"{self.title} {split} clouds have {points.shape[1]} points, fewer than num_points="
                f"{self.hparams.num_points}"
            )
        return points, labels

    def setup(self, stage: str | None = None) -> None:
        """Read both official splits once, and cut the validation split out of train ("final")."""
        if self.data:
            return
        hp = self.hparams
        pool = math.ceil(TRAIN_POOL * hp.num_points)
        train_points, train_labels = self._checked("train", pool)
        test_points, test_labels = self._checked("test", pool if hp.votes > 1 else hp.num_points)
        self.pool = min(pool, train_points.shape[1])
        if hp.protocol == "final":
            kept, held = stratified_split(train_labels.numpy(), hp.val_fraction, hp.seed)
            self.data["val"] = (train_points[held], train_labels[held])
        else:
            kept = np.arange(len(train_labels))
            self.data["val"] = (test_points, test_labels)
        if hp.shots:  # few-shot: k training clouds per class, seeded
            kept = kept[k_shot_indices(train_labels[kept].tolist(), hp.shots, hp.seed + 1)]
        self.data["train"] = (train_points[kept], train_labels[kept])
        self.data["test"] = (test_points, test_labels)

    def train_transform(self) -> PointTransform:
        """A random `num_points` of the first ceil(1.2 N) FPS points, in random order, then the augmentation."""
        self.setup()
        return Compose([RandomSubset(self.hparams.num_points, self.pool), build_augment(self.hparams.augment)])

    def vote_transform(self) -> PointTransform:
        """One vote: a fresh random subset, as in training, then `vote_augment` (Point-MAE: scale and translate)."""
        self.setup()
        test_pool = min(self.pool, self.data["test"][0].shape[1])
        return Compose([RandomSubset(self.hparams.num_points, test_pool), build_augment(self.hparams.vote_augment)])

    def dataset(self, split: str) -> PointClouds:
        self.setup()
        hp = self.hparams
        points, labels = self.data[split]
        if split == "train":
            return PointClouds(points, labels, hp.num_points, self.train_transform())
        if split == "test" and hp.votes > 1:
            return PointClouds(points, labels, hp.num_points, self.vote_transform(), votes=hp.votes, seed=hp.seed)
        return PointClouds(points, labels, hp.num_points)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return split_loader(self.dataset(split), hp.batch_size, shuffle, drop_last=hp.drop_last,
                            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)  # fmt: skip

    def _missing(self, what: str) -> MissingPointData:
        return MissingPointData(f"{self.title}: {what}. {layout_hint(self.layout, self.page)}")


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


class ScanObjectNNDataModule(_PointDataModule):
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
        return _fps_prefix(points, keep, self.hparams.num_points, fps_ordered=False), torch.from_numpy(labels)


# -- ModelNet40: Point-BERT's pickles -----------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as protocol 2 stores bytes: (str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as protocol-2 pickles store b''; any argument (`bytes(10**12)`) is refused."""
    if args:
        raise pickle.UnpicklingError("bytes(...) is allowed only without arguments (protocol 2's b'')")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy arrays and dtypes need, under both numpy 1's and numpy 2's module names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol 5
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy arrays need; any other global (os.system, a class whose `__reduce__` runs
    code, ...) is refused when the pickle names it, before anything is called."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path, self.allowed = path, _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self.path}: it references the global {module}.{name}, but a ModelNet40 pickle "
                "holds only numpy arrays (allowed: numpy ndarray / dtype / _reconstruct / scalar / _frombuffer). "
                "It is not Point-BERT's file or it was tampered with; nothing in it was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to load {self.path}: it uses persistent ids, which a ModelNet40 pickle never does")


PICKLE_FORMAT = "[list of P x 6 float32 arrays, list of int32 (1,) label arrays] of equal length"


def load_modelnet_pickle(path: Path, num_classes: int = 40) -> tuple[list[np.ndarray], np.ndarray]:
    """(clouds, labels [n] int64) of a Point-BERT ModelNet40 pickle, through `_ArrayUnpickler`, then checked."""
    try:
        with open(path, "rb") as file:
            content = _ArrayUnpickler(file, path).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001  (truncated or foreign files raise anything from EOFError to TypeError)
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


class ModelNet40DataModule(_PointDataModule):
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
                ordered = _fps_prefix(torch.stack([part[i] for i in rows]), keep, self.hparams.num_points, False)
                points[[start + i for i in rows]] = ordered[:, :keep]
        return points, torch.tensor(labels, dtype=torch.int64)
