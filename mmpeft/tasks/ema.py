"""An exponential moving average of the trainable set (SSF's FGVC recipe evaluates one with decay 0.9998;
diffusion fine-tuning keeps one too). Only what trains is averaged, so it costs a copy of KBs to MBs,
not of the backbone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from mmpeft.core.model import PeftModel

__all__ = ["EMACallback", "TrainableEMA"]


class TrainableEMA:
    """`shadow = decay * shadow + (1 - decay) * current` after every optimizer step, over the model's
    trainable state (parameters and the buffers of modules that train whole, e.g. a head's BatchNorm)."""

    def __init__(self, model: PeftModel, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(model)

    @staticmethod
    def _trainable(model: PeftModel) -> dict[str, torch.Tensor]:
        state = model.state_dict(keep_vars=True)
        return {k: state[k] for k in model.trainable_state_dict()}

    def _live(self, model: PeftModel) -> dict[str, torch.Tensor]:
        """The model's trainable state, which must be the set the average was started on."""
        live = self._trainable(model)
        if live.keys() != self.shadow.keys():
            new, gone = sorted(live.keys() - self.shadow.keys()), sorted(self.shadow.keys() - live.keys())
            raise RuntimeError(
                f"the model's trainable set changed after its EMA was started (new: {new[:3]}, gone: {gone[:3]}); "
                "call ema.reset(model) once the model is complete (e.g. after adding a component with a method)"
            )
        return live

    def reset(self, model: PeftModel) -> None:
        """Start the average at the model's current weights (again, after the model gained trainable tensors)."""
        self.shadow = {k: v.detach().clone() for k, v in self._trainable(model).items()}

    @torch.no_grad()
    def update(self, model: PeftModel) -> None:
        for key, live in self._live(model).items():
            shadow = self.shadow[key]
            if shadow.device != live.device:
                shadow = self.shadow[key] = shadow.to(live.device)
            if shadow.is_floating_point():
                shadow.lerp_(live.detach(), 1.0 - self.decay)
            else:
                shadow.copy_(live)

    @torch.no_grad()
    def swap(self, model: PeftModel) -> None:
        """Exchange the model's weights and the average (call twice to undo)."""
        for key, live in self._live(model).items():
            current = live.detach().clone()
            live.copy_(self.shadow[key].to(live.device))
            self.shadow[key] = current

    @torch.no_grad()
    def copy_to(self, model: PeftModel) -> None:
        for key, live in self._live(model).items():
            live.copy_(self.shadow[key].to(live.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {sorted(missing)[:3]}")
        self.shadow = {k: state[k].clone() for k in self.shadow}


class EMACallback(pl.Callback):
    """The EMA of the trainable set as a Lightning callback, with the hooks of Lightning's `WeightAveraging`:
    updated after every optimizer step, swapped in for validation, test and predict (and back), copied into the
    model when training ends (the final adapter file and testing see the average), and kept in checkpoints.
    Unlike `WeightAveraging` (and `AveragedModel`, timm's `ModelEmaV3`), which deep-copy the whole module, the
    shadow holds the trainable set only: KBs to MBs, not a second frozen backbone.

    The average starts from the model as it is when the run sets up (its components and any adapter loaded).
    `PeftTask(ema_decay=...)` adds one (`configure_callbacks`); `--trainer.callbacks+=mmpeft.tasks.EMACallback
    --trainer.callbacks.decay=0.999` is the same from the command line."""

    def __init__(self, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.ema: TrainableEMA | None = None
        self._swapped = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.ema is None:
            self.ema = TrainableEMA(pl_module.model, self.decay)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update(pl_module.model)

    def _swap(self, pl_module: pl.LightningModule, into_model: bool) -> None:
        if self.ema is not None and self._swapped != into_model:
            self.ema.swap(pl_module.model)
            self._swapped = into_model

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swap(pl_module, True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap(pl_module, False)

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_predict_epoch_end = on_validation_epoch_end

    def on_train_end(self, trainer, pl_module) -> None:
        """From here on (the final adapter file, testing) the model holds the average."""
        self.ema.copy_to(pl_module.model)

    @contextlib.contextmanager
    def averaged(self, model: PeftModel) -> Iterator[PeftModel]:
        """The model with the average in it for the duration (e.g. writing an adapter file mid-run)."""
        swap = self.ema is not None and not self._swapped
        if swap:
            self.ema.swap(model)
        try:
            yield model
        finally:
            if swap:
                self.ema.swap(model)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
