"""k-shot subsets: k training examples per class, chosen with a seed (CoOp-style few-shot runs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["k_shot_indices"]


def k_shot_indices(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Sorted indices of `shots` examples of every class present in `labels`."""
    if shots < 1:
        raise ValueError(f"shots must be a positive number of examples per class, got {shots}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in np.unique(labels):
        of_c = np.flatnonzero(labels == c)
        if len(of_c) < shots:
            raise ValueError(f"class {c} has only {len(of_c)} training examples, fewer than shots={shots}")
        chosen += rng.choice(of_c, size=shots, replace=False).tolist()
    return sorted(chosen)
