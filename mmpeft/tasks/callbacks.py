"""Callbacks every run gets: adapter files at the end of fit and with every checkpoint, and
step-time / peak-memory logging."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from mmpeft.core.files import writing
from mmpeft.core.process_memory import ProcessPeak
from mmpeft.core.state import save_adapter

__all__ = [
    "DEFAULT_CALLBACKS",
    "default_callbacks",
    "default_callback_classes",
    "AdapterExport",
    "NamingCheckpointIO",
    "RunStats",
    "TerminationCheckpoint",
    "PredictionWriter",
    "human_bytes",
    "run_dir",
]


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's directory, read without a collective: `trainer.log_dir` broadcasts from rank 0, so
    calling it from rank-0-only code (file writing) deadlocks a DDP run."""
    logger = trainer.loggers[0] if trainer.loggers else None
    path = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(path or getattr(logger, "save_dir", None) or trainer.default_root_dir)


class AdapterExport(pl.Callback):
    """Writes `<log_dir>/adapter.safetensors` when fit ends, and one beside every checkpoint."""

    def __init__(self, filename: str = "adapter.safetensors"):
        self.filename = filename
        self.last_path: Path | None = None
        self.last_bytes = 0

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> int:
        weights = pl_module.evaluation_weights() if hasattr(pl_module, "evaluation_weights") else nullcontext()
        with weights:  # the EMA's weights when the task keeps one
            extra = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
            with writing(path, "the adapter file"):
                size = save_adapter(pl_module.model, path, extra=extra)
        self.last_path, self.last_bytes = path, size
        for logger in trainer.loggers:
            logger.log_metrics({"adapter/bytes": size}, step=trainer.global_step)
        return size

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            folder = run_dir(trainer) / "checkpoints"
            tag = f"epoch={trainer.current_epoch}-step={trainer.global_step}"
            self._prune(folder, keep=tag)
            self._save(trainer, pl_module, folder / f"adapter-{tag}.safetensors")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._prune(run_dir(trainer) / "checkpoints")
            self._save(trainer, pl_module, run_dir(trainer) / self.filename)

    @staticmethod
    def _prune(folder: Path, keep: str | None = None) -> None:
        """Adapter files live only beside checkpoints that still exist (the checkpoint callback deletes the
        ones it no longer keeps), so they do not pile up one per epoch."""
        kept = {p.stem.rsplit("epoch=", 1)[-1] for p in folder.glob("*.ckpt")}
        for adapter in folder.glob("adapter-epoch=*.safetensors"):
            tag = adapter.stem.removeprefix("adapter-")
            if tag != keep and tag.removeprefix("epoch=") not in kept:
                adapter.unlink()


class NamingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with a full disk named: `DiskFull` with the checkpoint's path (Lightning's
    own error is a bare errno from inside fsspec). Its transaction leaves no partial file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        with writing(path, "the checkpoint"):
            super().save_checkpoint(checkpoint, path, storage_options)


class RunStats(pl.Callback):
    """Logs the training step time (ms) and, per epoch, peak memory above the post-build baseline.

    Step time is the interval between consecutive batch ends, so no per-step device sync is needed:
    on a GPU the queue absorbs it and the median over steps is the steady-state step time.
    (`mmpeft bench` synchronises explicitly for its own measurements.)
    """

    def __init__(self) -> None:
        self.step_ms: list[float] = []
        self._last: float | None = None
        self._memory: ProcessPeak | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._memory = ProcessPeak(pl_module.device)
        self._memory.start()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # data-loader start-up is not a step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # nor is a validation run between two training batches

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        ms = 1000 * (now - self._last)
        self._last = now
        self.step_ms.append(ms)
        pl_module.log("perf/step_ms", ms, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._memory is not None:
            peak = self._memory.stop()
            pl_module.log("perf/peak_mem_mb", peak / 2**20, sync_dist=True, reduce_fx="max")  # the busiest rank
            self._memory.start(keep_baseline=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._memory is not None:
            self._memory.stop()
        if self.step_ms:
            for logger in trainer.loggers:
                logger.log_metrics({"perf/median_step_ms": statistics.median(self.step_ms)}, step=trainer.global_step)


class TerminationCheckpoint(pl.Callback):
    """On SIGTERM (a scheduler's pre-emption, `kill`), save a resumable checkpoint before the run ends:
    `<run dir>/checkpoints/terminated-epoch=E-step=S.ckpt` with the loops' position and the RNG states.
    Lightning turns SIGTERM into `SIGTERMException` (a SystemExit with code 0); the CLI exits 143 and says
    how to resume."""

    last_path: Path | None = None  # the checkpoint this process wrote on SIGTERM (read by the CLI's exit message)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        name = f"terminated-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        path = run_dir(trainer) / "checkpoints" / name
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        TerminationCheckpoint.last_path = path


class PredictionWriter(pl.Callback):
    """`mmpeft predict` writes what it computed: `<run dir>/predictions.csv` (one row per input: its id where
    the dataset has one, e.g. the image path, else its index; the predicted class and its probability for
    classifiers) and `predictions.pt` with the raw outputs. With DDP each rank writes its own share."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.outputs = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs.detach().float().cpu())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.outputs:
            return
        outputs = torch.cat(self.outputs)
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        with writing(folder / f"predictions{suffix}.pt", "the predictions"):
            torch.save(outputs, folder / f"predictions{suffix}.pt")
        ids = _input_ids(trainer, len(outputs))
        lines = ["id,prediction,probability"] if outputs.dim() == 2 else ["id"]
        probabilities = outputs.softmax(-1) if outputs.dim() == 2 else None
        for i, ident in enumerate(ids):
            if probabilities is None:
                lines.append(f"{ident}")
            else:
                score, label = probabilities[i].max(-1)
                lines.append(f"{ident},{int(label)},{float(score):.6f}")
        self.path = folder / f"predictions{suffix}.csv"
        with writing(self.path, "the predictions"):
            self.path.write_text("\n".join(lines) + "\n")
        print(f"predictions: {self.path} ({len(ids)} rows) and {self.path.with_suffix('.pt').name}")


def _input_ids(trainer: pl.Trainer, count: int) -> list[str]:
    """The dataset's own item names (image-list and FGVC datasets keep (path, label) items), else indices."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    items = getattr(getattr(loader, "dataset", None), "items", None)
    if items is not None and len(items) == count:
        return [str(item[0]) if isinstance(item, tuple | list) else str(item) for item in items]
    return [str(i) for i in range(count)]


# What `mmpeft fit|validate|test|predict` runs with unless the config says otherwise: `trainer.callbacks`
# defaults to these (`mmpeft fit --print_config` lists them); `--trainer.callbacks+=X` adds X to them, and a
# config's own `trainer.callbacks` list replaces them (drop one to turn it off, give init_args to configure one).
DEFAULT_CALLBACKS = (
    "mmpeft.tasks.callbacks.AdapterExport",
    "mmpeft.tasks.callbacks.RunStats",
    "mmpeft.tasks.callbacks.TerminationCheckpoint",
    "mmpeft.tasks.callbacks.PredictionWriter",
    "mmpeft.tasks.rng.RNGStateCheckpoint",
)


def default_callbacks() -> list[dict[str, str]]:
    """The default `trainer.callbacks` of mmpeft's command line, as config entries."""
    return [{"class_path": path} for path in DEFAULT_CALLBACKS]


def default_callback_classes() -> list[type[pl.Callback]]:
    """The default callbacks' classes (for a config that says `callbacks: null`)."""
    import importlib

    found = []
    for path in DEFAULT_CALLBACKS:
        module, _, name = path.rpartition(".")
        found.append(getattr(importlib.import_module(module), name))
    return found
