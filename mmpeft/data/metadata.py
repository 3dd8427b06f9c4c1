"""Dataset metadata shipped in the repository's `datasets/` folder (task lists, classes, groups, sizes)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DATASETS_DIR", "load_metadata"]

DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"


@cache
def load_metadata(name: str) -> dict[str, Any]:
    """`load_metadata("vtab1k")` reads `datasets/vtab1k.yaml`."""
    path = DATASETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"dataset metadata {path} is missing; mmpeft reads it from the repository checkout")
    return yaml.safe_load(path.read_text())
