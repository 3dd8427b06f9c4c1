"""The random number generators' states in checkpoints, so a resumed run draws what the uninterrupted one drew
(dropout, drop-path, augmentation in the main process); the training order is a function of (seed, epoch)
already. A default callback of `mmpeft fit`; without it a `--ckpt_path` resume says it is not exact."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["RNGStateCheckpoint", "rng_states", "set_rng_states"]


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (when present) CUDA RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers: loads with weights_only
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(pl.Callback):
    """Writes the RNG states into every checkpoint (`rng_states`) and restores them when a run resumes."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
