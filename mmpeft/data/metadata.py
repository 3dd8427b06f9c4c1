"""Dataset metadata shipped inside the package as `mmpeft/datasets/*.yaml` (task lists, classes, groups,
sizes), read with `importlib.resources` so a wheel install finds it as well as a checkout."""

from __future__ import annotations

from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.errors import UnknownName

__all__ = ["DATASETS_DIR", "load_metadata", "class_names", "metadata_names"]

DATASETS_DIR: Traversable = resources.files("mmpeft") / "datasets"  # package data (pyproject: package-data)


def metadata_names() -> list[str]:
    """The shipped metadata files by name: `["fgvc", "vtab1k"]`."""
    return sorted(p.name.removesuffix(".yaml") for p in DATASETS_DIR.iterdir() if p.name.endswith(".yaml"))


@cache
def load_metadata(name: str) -> dict[str, Any]:
    """`load_metadata("vtab1k")` reads `mmpeft/datasets/vtab1k.yaml`."""
    path = DATASETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UnknownName(f"no dataset metadata {name!r}; shipped: {', '.join(metadata_names())}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def class_names(source: str, task: str, root: str | Path | None = None) -> list[str]:
    """Class names of `mmpeft/datasets/<source>.yaml`'s `task` in label order.

    An entry either ships `class_names`, or names the dataset's own `class_names_file` (NABirds' classes.txt),
    read from `root`, the dataset folder, with each label's class id taken from its image folder.
    """
    meta = load_metadata(source)
    entry = meta.get("tasks", meta.get("datasets", {})).get(task)
    if entry is None:
        raise ValueError(f"mmpeft/datasets/{source}.yaml has no task {task!r}")
    class_file = entry.get("class_names_file")
    if root is not None and class_file is None:
        raise ValueError(f"{source}:{task} reads no class file from a dataset folder; drop '@{root}'")
    if entry.get("class_names"):
        return [str(name) for name in entry["class_names"]]
    if class_file is None:
        raise ValueError(f"mmpeft/datasets/{source}.yaml has no class names for {task!r}; pass class_names as a list")
    if root is None:
        raise ValueError(
            f"{entry.get('name', task)}'s class names are read from its own {class_file}: write "
            f"class_names: '{source}:{task}@<dataset folder>' (the folder holding {class_file} and train.json)"
        )
    from mmpeft.data.fgvc_files import names_from_class_folders

    return names_from_class_folders(Path(root), class_file)
