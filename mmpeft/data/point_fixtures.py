"""Tiny point-cloud datasets in the true on-disk formats, for smoke runs and tests (no download needed).

`write_scanobjectnn_fixture` writes real h5 files (`data` float32 [n, P, 3], `label` int64 [n], `mask`) under the
variant's official file names; `write_modelnet40_fixture` writes Point-BERT's pickles (a plain `pickle.dump` of
[list of P x 6 float32 arrays, list of int32 (1,) arrays]) or the raw txt layout. Every class is an ellipsoid of
its own proportions, so a model can learn them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mmpeft.data.modelnet40 import MODELNET40_CLASSES
from mmpeft.data.scanobjectnn import SCANOBJECTNN_FILES

__all__ = ["write_scanobjectnn_fixture", "write_modelnet40_fixture", "class_clouds"]


def class_clouds(labels: list[int], points: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Clouds [n, points, 6] (xyz on an ellipsoid whose axes depend on the class, then unit normals), float32."""
    axes = 0.4 + 0.6 * np.random.default_rng(1234).random((classes, 3))
    out = np.empty((len(labels), points, 6), dtype=np.float32)
    for i, label in enumerate(labels):
        direction = rng.normal(size=(points, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        xyz = direction * axes[label] + rng.normal(scale=0.02, size=(points, 3)) + rng.normal(scale=0.1, size=3)
        normal = direction / axes[label]
        out[i, :, :3], out[i, :, 3:] = xyz, normal / np.linalg.norm(normal, axis=1, keepdims=True)
    return out


def _labels(n: int, classes: int, offset: int) -> list[int]:
    return [(i * 7 + offset) % classes for i in range(n)]


def write_scanobjectnn_fixture(
    root: str | Path, variant: str = "PB_T50_RS", n_train: int = 45, n_test: int = 15, points: int = 64,
    seed: int = 0, mask: bool = True,
) -> Path:  # fmt: skip
    """ScanObjectNN h5 files of one variant under `root` (labels cycle over the 15 classes); returns `root`."""
    import h5py

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, n, offset in zip(SCANOBJECTNN_FILES[variant], (n_train, n_test), (0, 3)):
        labels = _labels(n, 15, offset)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as file:
            file.create_dataset("data", data=class_clouds(labels, points, 15, rng)[..., :3])
            file.create_dataset("label", data=np.array(labels, dtype=np.int64))
            if mask:  # the official files' per-point background mask, unused by every classifier
                file.create_dataset("mask", data=np.zeros((n, points), dtype=np.int64))
    return root


def write_modelnet40_fixture(
    root: str | Path, layout: str = "pickle", n_train: int = 80, n_test: int = 40, points: int = 64,
    seed: int = 0, protocol: int = 4,
) -> Path:  # fmt: skip
    """ModelNet40 in the pickle layout (`modelnet40_{split}_8192pts_fps.dat`, `points` points each, pickle
    `protocol`) or the txt layout (class folders, shape-id lists), with `modelnet40_shape_names.txt`."""
    if layout not in ("pickle", "txt"):
        raise ValueError(f"layout must be 'pickle' or 'txt', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 3)):
        labels = _labels(n, 40, offset)
        clouds = class_clouds(labels, points, 40, rng)
        if layout == "pickle":
            content = [list(clouds), [np.array([label], dtype=np.int32) for label in labels]]
            with open(root / f"modelnet40_{split}_8192pts_fps.dat", "wb") as file:
                pickle.dump(content, file, protocol=protocol)
            continue
        ids, counts = [], dict.fromkeys(MODELNET40_CLASSES, 0 if split == "train" else 500)
        for cloud, label in zip(clouds, labels):
            name = MODELNET40_CLASSES[label]
            counts[name] += 1
            shape_id = f"{name}_{counts[name]:04d}"  # airplane_0001 (test ids continue after train's, as in ModelNet)
            ids.append(shape_id)
            (root / name).mkdir(exist_ok=True)
            np.savetxt(root / name / f"{shape_id}.txt", cloud, fmt="%.6f", delimiter=",")
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return root
