"""Tiny datasets in the true on-disk formats, for smoke runs and tests (no download needed).

`write_vtab_fixture` writes VTAB-1k task folders exactly as the NOAH dump lays them out (four list
files, one JPEG copy per split, 800 / 200 / 1000 lines), with images whose colour depends on the
label, so a model can learn them and a sweep's selection has something to select.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmpeft.data.vtab import vtab_tasks

__all__ = ["write_vtab_fixture"]


def _labels(n: int, classes: int, offset: int) -> list[int]:
    return [(i * 7 + offset) % classes for i in range(n)]


def write_vtab_fixture(root: str | Path, tasks: list[str], test_size: int = 40, size: int = 16, seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    meta = vtab_tasks()
    for task in tasks:
        folder, classes = root / meta[task]["folder"], meta[task]["classes"]
        palette = rng.integers(0, 256, (classes, 3))
        labels = {"train800": _labels(800, classes, 0), "val200": _labels(200, classes, 3)}
        labels["train800val200"] = labels["train800"] + labels["val200"]  # the dump's copies of both
        labels["test"] = _labels(test_size, classes, 5)
        for split, split_labels in labels.items():
            (folder / "images" / split).mkdir(parents=True, exist_ok=True)
            lines = []
            for i, label in enumerate(split_labels):
                rel = f"images/{split}/{i:06d}.jpg"
                noise = rng.integers(-40, 40, (size, size, 3))
                pixels = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / rel, quality=90)
                lines.append(f"{rel} {label}")
            (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "runs/smoke-data"
    print(write_vtab_fixture(target, ["eurosat", "kitti"]))
