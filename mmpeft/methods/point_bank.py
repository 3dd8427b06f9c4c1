"""Point-PEFT's memory bank as a file of its own: the frozen pretrained encoder's query features of a training split
(`PointTransformer.query_features`, through `disabled()`), with their provenance.

The bank is derived state: it is rebuilt from the backbone and the data, never stored in an adapter file (the
adapter's header names the bank file and its checksum instead). A bank file carries what made it — the backbone's
signature, the frozen weights' fingerprint, the dataset, the split, the count, the query grouping and the clouds'
size — and is refused, naming the mismatch, by a run whose backbone or data differ. Without a path a bank lives in
the cache, under a name derived from its provenance, so a second run with the same backbone and data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import MmpeftError
from mmpeft.core.files import cache_dir, writing

__all__ = ["BankMismatch", "bank_provenance", "build_bank", "save_bank", "load_bank", "default_bank_path", "sha256"]

FEATURES = "features"
# the fields a run compares with a bank file's, in the order a refusal names them
CHECKED = ("backbone", "weights", "dataset", "split", "count", "query_grouping", "num_points")


class BankMismatch(MmpeftError, ValueError):
    """A memory bank made with another backbone, other weights or other data than this run's."""


def bank_provenance(backbone: nn.Module, query_grouping: tuple[int, int], dataset: str, split: str, count: int,
                    num_points: int) -> dict[str, Any]:  # fmt: skip
    """What a bank is made of: the backbone's signature and frozen-weights fingerprint, the data, the grouping."""
    from mmpeft.core.identity import weights_identity
    from mmpeft.core.model import backbone_signature

    trained = set(getattr(getattr(backbone, "_mmpeft_method", None), "trained_in_place", lambda b: [])(backbone))
    return {
        "backbone": backbone_signature(backbone),
        "weights": weights_identity(backbone).fingerprint(exclude=trained) or "unknown",
        "dataset": dataset,
        "split": split,
        "count": int(count),
        "query_grouping": [int(v) for v in query_grouping],
        "num_points": int(num_points),
    }


@torch.no_grad()
def build_bank(backbone: nn.Module, clouds: Iterable[torch.Tensor], query_grouping: tuple[int, int],
               total: int | None = None, progress: bool = True) -> torch.Tensor:  # fmt: skip
    """[M, D] query features of every batch of `clouds` ([B, N, 3]), in order, with a progress bar."""
    from tqdm.auto import tqdm

    device = next(backbone.parameters()).device
    batches = tqdm(clouds, total=total, desc="Point-PEFT memory bank", unit="batch", disable=not progress)
    features = [backbone.query_features(batch.to(device), *query_grouping).float().cpu() for batch in batches]
    return torch.cat(features)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_bank_path(provenance: dict[str, Any]) -> Path:
    """The cache file of a bank with this provenance."""
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "point_peft_banks" / f"{key}.safetensors"


def save_bank(path: str | os.PathLike, features: torch.Tensor, provenance: dict[str, Any]) -> str:
    """Write the bank (safetensors, the provenance in its metadata) through a temporary file; returns its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with writing(path, "the memory bank"):
        save_file({FEATURES: features.contiguous()}, str(partial), metadata={"provenance": json.dumps(provenance)})
        os.replace(partial, path)
    return sha256(path)


def load_bank(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> tuple[torch.Tensor, str]:
    """(features [M, D], sha256) of a bank file; with `expected`, a provenance that differs in any checked field is
    refused, naming each difference."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory bank at {path}; build it: `mmpeft bank -c CONFIG` (fit builds it too)")
    with safe_open(str(path), "pt") as f:
        made = json.loads((f.metadata() or {}).get("provenance", "{}"))
        features = f.get_tensor(FEATURES)
    if expected is not None:
        differ = [f"{key}: file {made.get(key)!r}, this run {expected[key]!r}" for key in CHECKED
                  if made.get(key) != expected.get(key)]  # fmt: skip
        if differ:
            raise BankMismatch(
                f"the memory bank {path} was made for another backbone or other data ({'; '.join(differ)}); "
                "build one for this run (`mmpeft bank -c CONFIG`, or leave the method's `bank` unset to use the cache)"
            )
    return features, sha256(path)
