"""Dataset metadata shipped in the repository's `datasets/` folder (task lists, classes, groups, sizes)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DATASETS_DIR", "load_metadata", "class_names"]

DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"


@cache
def load_metadata(name: str) -> dict[str, Any]:
    """`load_metadata("vtab1k")` reads `datasets/vtab1k.yaml`."""
    path = DATASETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"dataset metadata {path} is missing; mmpeft reads it from the repository checkout")
    return yaml.safe_load(path.read_text())


def class_names(source: str, task: str, root: str | Path | None = None) -> list[str]:
    """Class names of `datasets/<source>.yaml`'s `task` in label order.

    An entry either ships `class_names`, or names the dataset's own `class_names_file` (NABirds' classes.txt),
    read from `root`, the dataset folder, with each label's class id taken from its image folder.
    """
    meta = load_metadata(source)
    entry = meta.get("tasks", meta.get("datasets", {})).get(task)
    if entry is None:
        raise ValueError(f"datasets/{source}.yaml has no task {task!r}")
    class_file = entry.get("class_names_file")
    if root is not None and class_file is None:
        raise ValueError(f"{source}:{task} reads no class file from a dataset folder; drop '@{root}'")
    if entry.get("class_names"):
        return [str(name) for name in entry["class_names"]]
    if class_file is None:
        raise ValueError(f"datasets/{source}.yaml has no class names for {task!r}; pass class_names as a list")
    if root is None:
        raise ValueError(
            f"{entry.get('name', task)}'s class names are read from its own {class_file}: write "
            f"class_names: '{source}:{task}@<dataset folder>' (the folder holding {class_file} and train.json)"
        )
    from mmpeft.data.fgvc import names_from_class_folders  # noqa: PLC0415  (fgvc imports this module)

    return names_from_class_folders(Path(root), class_file)
