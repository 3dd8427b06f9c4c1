"""`PeftTask`: the shared LightningModule. It builds backbone + method + head, the optimizer groups
and the schedule, and runs the one training step (`mmpeft.tasks.step`); task families only say how a
batch becomes the backbone's input and targets, and how outputs become a loss and metrics.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from torch import nn

from mmpeft.backbones import backbone_from_spec
from mmpeft.core.cache import DEFAULT_MAX_BYTES
from mmpeft.core.errors import MmpeftError
from mmpeft.core.identity import weights_identity
from mmpeft.core.method import Method, method_from_spec
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.core.state import NonFiniteTensors, check_weights, load_adapter, non_finite
from mmpeft.tasks.callbacks import run_dir
from mmpeft.tasks.ema import EMACallback, TrainableEMA
from mmpeft.tasks.epoch_mean import EpochMean
from mmpeft.tasks.feature_cache import FeatureCaches
from mmpeft.tasks.optim import (
    SCHEDULES,
    build_optimizer,
    describe_groups,
    param_groups,
    timm_cosine,
    warmup_cosine,
    warmup_linear,
)
from mmpeft.tasks.rng import rng_states, set_rng_states
from mmpeft.tasks.step import step_loss

__all__ = ["NonFiniteLoss", "PeftTask", "rng_states", "set_rng_states"]  # the RNG helpers live in tasks.rng

# Frozen backbones run (partly) in eval mode by design: the frozen-mode policy, not a mistake.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class NonFiniteLoss(MmpeftError, FloatingPointError):
    """A training loss became NaN or inf: the run stops (exit 1), naming the step and the last good checkpoint."""

    exit_code = 1


class PeftTask(pl.LightningModule):
    """Base task: a frozen backbone with one PEFT method and an optional head.

    A family subclasses it with `prepare_batch` (batch -> backbone input, targets), `loss_and_metrics`
    (output, targets -> loss, logging its metrics) and `monitor` / `monitor_mode` (the metric runs,
    summaries and sweeps select on).

    Args:
        backbone: the frozen backbone (YAML: `class_path` + `init_args`), or a name `create_backbone` builds with
            its defaults (`digits_vit`, a timm model name, `open_clip:ViT-B-32:image`; `mmpeft fit --help` lists them).
        method: a method name (`lora`) or a mapping (`{name: lora, r: 16}`, `{name: ssf, preset: paper}`).
        num_classes: head size; linked from the datamodule by the CLI when it has classes; None: no head.
        head: the head's spec: `linear` (default) or `{name: mlp, hidden: [256, 256], norm: batch, dropout: 0.5}`;
            `init:` overrides the method's head init.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        lr: peak learning rate, reached at the end of warmup (a method's own groups scale it).
        weight_decay: on trainable tensors except those the method exempts (1-D tensors and prompts by default).
        warmup_epochs: linear warmup from 0, in epochs (fractions allowed); then cosine to `min_lr`.
        min_lr: the learning rate the cosine ends at.
        schedule: "warmup_cosine" (per step: warmup from 0, cosine over the rest) or "timm_cosine" (per epoch,
            timm's `CosineLRScheduler` as SSF runs it: warmup from `warmup_lr`, cosine over `max_epochs -
            cooldown_epochs`, then `min_lr` held for the cooldown), or "linear" (per step: warmup from 0, then
            linear to `min_lr`; EfficientDM's distillation).
        warmup_lr, cooldown_epochs: the "timm_cosine" schedule's start lr and held epochs.
        grad_checkpointing: recompute each block in backward, same gradients.
        ema_decay: keep an exponential moving average of the trainable set (e.g. 0.9998, SSF's FGVC recipe);
            validation, testing, the adapter files and the final model use it.
        adapter: an adapter file to start from (evaluate it, or continue training it).
        allow_other_weights: load adapter files (and resume checkpoints) trained on other frozen weights than the
            backbone holds, with a warning, instead of refusing them (e.g. an adapter moved to a fine-tuned
            checkpoint of the same architecture).
        feature_cache: cache the frozen backbone's pooled features per training / validation sample and run
            only the head on them (the cached linear probe; see `ImageClassification`): True, False, or "auto"
            (on exactly when nothing in the backbone trains and no method piece is attached). Off here by default;
            `ImageClassification` defaults to "auto".
        feature_cache_bytes: the byte budget of each feature cache (training, validation); beyond it samples are
            computed every time.
        frozen_dtype: "bfloat16" (with `trainer.precision: bf16-mixed`) stores the frozen matmul weights in bf16:
            half the backbone's memory and no per-step cast under autocast; the trainable set, head, norms and
            optimizer stay fp32 (`mmpeft.core.precision`). Full fine-tuning refuses it. None: fp32.
    """

    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"

    def __init__(
        self,
        backbone: nn.Module | str,
        method: str | dict[str, Any] | None = "linear",
        num_classes: int | None = None,
        head: str | dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        schedule: str = "warmup_cosine",
        warmup_lr: float = 0.0,
        cooldown_epochs: int = 0,
        grad_checkpointing: bool = False,
        ema_decay: float | None = None,
        adapter: str | None = None,
        allow_other_weights: bool = False,
        feature_cache: bool | str = False,
        feature_cache_bytes: int = DEFAULT_MAX_BYTES,
        frozen_dtype: str | None = None,
    ):
        super().__init__()
        backbone = backbone_from_spec(backbone)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        self.save_hyperparameters(ignore=["backbone", "text_tower"])
        if grad_checkpointing:
            if not hasattr(backbone, "set_grad_checkpointing"):
                raise ValueError(f"{type(backbone).__name__} does not support activation checkpointing")
            backbone.set_grad_checkpointing(True)
        self.model = PeftModel(backbone, method_from_spec(method), num_classes=num_classes or None, head=head)
        if frozen_dtype is not None:  # after the method froze the backbone
            self.model.cast_frozen(frozen_dtype)
        self.epoch_means = nn.ModuleDict()  # one weighted mean per logged metric (`log_epoch`), no saved state
        self._ema_default = EMACallback(ema_decay) if ema_decay else None  # checks the decay now, not at fit
        self.strict_loading = False  # checkpoints hold the trainable set only; the frozen rest comes from config
        if adapter:
            self.load_adapter(adapter)
        own_forward = type(self).forward is not PeftTask.forward  # a task computing its output its own way
        self.feature_caches = FeatureCaches(self, feature_cache, feature_cache_bytes, own_forward)

    # -- the method's view -----------------------------------------------------------------------------
    @property
    def method(self):
        return self.model.method

    def load_adapter(self, path: str) -> dict[str, Any]:
        header = load_adapter(self.model, path, allow_other_weights=self.hparams.allow_other_weights)
        rank_zero_info(f"loaded adapter {path}")
        return header

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model(inputs)

    # -- what task families implement ---------------------------------------------------------------------
    def prepare_batch(self, batch: Any, stage: str) -> tuple[Any, Any]:
        """(backbone input, targets) of a batch; by default `(batch[0], batch[1])`."""
        return batch[0], batch[1]

    def loss_and_metrics(self, output: torch.Tensor, targets: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def log_epoch(self, name: str, value: torch.Tensor, batch_size: int, stage: str, prog_bar: bool = False) -> None:
        """An epoch metric, averaged over samples and across DDP ranks (training also logs its step values).

        The mean is an `EpochMean` (sums reduced across ranks), not Lightning's `sync_dist` mean, which scored
        161 test samples on 2 ranks as 160."""
        key = f"{stage}/{name}"
        slot = key.replace("/", "__")
        if slot not in self.epoch_means:
            self.epoch_means[slot] = EpochMean().to(value.device)
        metric = self.epoch_means[slot]
        metric(value.detach(), batch_size)
        self.log(key, metric, on_step=stage == "train", on_epoch=True, prog_bar=prog_bar,
                 metric_attribute=f"epoch_means.{slot}")  # fmt: skip

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.prepare_batch(batch, "train")
        model = self.feature_caches.runner(self, "train", inputs) or self.model
        result = step_loss(model, inputs, targets, lambda out, tgt: self.loss_and_metrics(out, tgt, "train"))
        if not bool(torch.isfinite(result.loss.detach())):
            raise NonFiniteLoss(self._divergence_message(result.loss, batch_idx))
        if result.extra_loss is not None:
            self.log("train/extra_loss", result.extra_loss.detach())
        return result.loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        inputs, targets = self.prepare_batch(batch, stage)
        cached = self.feature_caches.runner(self, stage, inputs)
        output = self(inputs) if cached is None else cached(inputs)
        self.loss_and_metrics(output, targets, stage)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = self.prepare_batch(batch, "predict")[0] if isinstance(batch, list | tuple) else batch
        return self(inputs)

    def setup(self, stage: str) -> None:
        """Before any step of any stage: the method's derived state from the data (`Method.prepare`; Point-PEFT's
        memory bank), built by one process while the others wait, then loaded by each."""
        super().setup(stage)
        self._check_frozen_dtype()
        if type(self.method).prepare is Method.prepare:
            return
        data = self.method_data(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        with self._frozen_autocast():  # the derived state is computed through the (maybe bf16) frozen backbone
            if self._trainer is None:  # (LightningModule.print needs a trainer)
                self.method.prepare(self.model.backbone, data, log=print)
                return
            if self.trainer.is_global_zero:
                self.method.prepare(self.model.backbone, data, log=self.print)
            self.trainer.strategy.barrier("method derived state")
            if not self.trainer.is_global_zero:
                self.method.prepare(self.model.backbone, data, may_build=False, log=self.print)

    def _frozen_autocast(self) -> Any:
        """Autocast to the frozen dtype for work outside Lightning's steps (off when the weights are fp32)."""
        from mmpeft.core.precision import FROZEN_DTYPES

        frozen = self.hparams.get("frozen_dtype")
        if frozen is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=FROZEN_DTYPES[frozen])

    def _check_frozen_dtype(self) -> None:
        """Frozen weights in bf16 meet fp32 activations only under autocast: the trainer's precision must be the
        matching mixed one."""
        frozen = self.hparams.get("frozen_dtype")
        if frozen is None or self._trainer is None:
            return
        from mmpeft.core.errors import ConfigMismatch
        from mmpeft.core.precision import needed_precision

        precision = str(self.trainer.precision)
        if precision != needed_precision(frozen):
            raise ConfigMismatch(
                f"frozen_dtype {frozen!r} stores the frozen weights in {frozen}, which meet the fp32 activations "
                f"only under autocast: set --trainer.precision {needed_precision(frozen)} (got {precision})"
            )

    def method_data(self, datamodule: Any) -> Any:
        """What `Method.prepare` builds from: the run's datamodule (a diffusion task adds its teacher's trajectory)."""
        return datamodule

    def on_fit_start(self) -> None:
        report = parameter_report(self.model)
        stats = {
            "params/trainable": report.trainable,
            "params/trainable_no_head": report.trainable_no_head,
            "params/backbone": report.backbone,
            "params/percent_of_backbone": report.percent,
        }
        for logger in self.loggers:
            logger.log_hyperparams({"method": self.method.name, **stats})
        self.print(
            f"method {self.method.name}: {report.trainable:,} trainable parameters "
            f"({report.trainable_no_head:,} without head, {report.percent:.3f}% of the "
            f"{report.backbone:,}-parameter backbone)"
        )
        if self.feature_caches:
            self.print("feature cache on: the frozen backbone runs once per training / validation input")
        warning = random_frozen_backbone_warning(self.model)
        if warning:
            rank_zero_warn(warning)
            self.print(f"\n{'!' * 100}\nWARNING: {warning}\n{'!' * 100}\n")

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, self.method, hp.weight_decay, hp.lr)
        optimizer = build_optimizer(groups, hp.optimizer, hp.lr)
        rank_zero_info(f"optimizer {hp.optimizer}, peak lr per group:\n{describe_groups(groups)}")
        epochs = max(self.trainer.max_epochs or 1, 1)
        if hp.schedule == "timm_cosine":  # per epoch; each group's own base lr, timm's absolute warmup / min lr
            warmup = int(hp.warmup_epochs)
            scheduler = timm_cosine(optimizer, epochs, warmup, hp.cooldown_epochs, hp.warmup_lr, hp.min_lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        shape = warmup_linear if hp.schedule == "linear" else warmup_cosine
        factor = shape(total, warmup, hp.min_lr / hp.lr if hp.lr else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """timm's schedulers take the epoch they set the rate for; the fit loop calls this at an epoch's end,
        before it counts that epoch, so the rate is the next one's, `current_epoch + 1`."""
        if isinstance(scheduler, TimmScheduler):
            scheduler.step(epoch=self.current_epoch + 1)
        else:
            super().lr_scheduler_step(scheduler, metric)

    # -- the cached linear probe (`mmpeft.tasks.feature_cache`) ------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.feature_caches.start_pass("train")

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.validating:  # a full pass: not a sanity check, not a test
            self.feature_caches.start_pass("val")

    # -- EMA of the trainable set: a callback (`mmpeft.tasks.ema.EMACallback`) ------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        """`ema_decay` adds the EMA callback to whatever trainer runs this task."""
        return [self._ema_default] if self._ema_default is not None else []

    def _ema_callback(self) -> EMACallback | None:
        trainer = self._trainer
        found = [c for c in trainer.callbacks if isinstance(c, EMACallback)] if trainer is not None else []
        return found[0] if found else self._ema_default

    @property
    def ema(self) -> TrainableEMA | None:
        """The running average of the trainable set (None without an EMA callback or before the run sets up)."""
        callback = self._ema_callback()
        return callback.ema if callback is not None else None

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[PeftModel]:
        """The model with the weights evaluation uses (the EMA's when on) — e.g. for adapter files."""
        callback = self._ema_callback()
        with callback.averaged(self.model) if callback is not None else contextlib.nullcontext(self.model) as model:
            yield model

    def _divergence_message(self, loss: torch.Tensor, batch_idx: int) -> str:
        """Where the run diverged and what is left to resume from."""
        trainer = self.trainer
        folder = run_dir(trainer) / "checkpoints"
        kept = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        resume = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
        return (
            f"the training loss is {float(loss.detach())} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step} (batch {batch_idx} of the epoch): the run diverged and is stopped, with nothing "
            f"non-finite written; {resume}. Lower the learning rate (lr={self.hparams.lr}) or check the data"
        )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable set (and trained buffers): frozen weights come from the backbone config. (The
        RNG states and the EMA are the callbacks' part of the checkpoint: `tasks.rng`, `tasks.ema`.)"""
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = non_finite(checkpoint["state_dict"])
        if bad:
            raise NonFiniteTensors(
                f"not writing a checkpoint at step {checkpoint.get('global_step')}: {len(bad)} trained tensors hold "
                f"NaN or inf (e.g. {bad[:3]}); the run diverged — lower the learning rate or check the data"
            )
        checkpoint["frozen_weights"] = self.model.weights_records()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_weights(checkpoint.get("frozen_weights"), self.model, "checkpoint", self.hparams.allow_other_weights)
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_loop.get("combined_loader") or []

    def on_train_start(self) -> None:
        """Continue the training loader where the checkpoint left it (mid-epoch included). Lightning hands a
        loader its saved state only when it builds the loader after restoring the loops, but the schedule's
        `estimated_stepping_batches` builds it before; here, after the restore and before the first batch is
        drawn, is where the saved position reaches the loader (`mmpeft.data.sampling.ResumableLoader`)."""
        states, self._loader_states = getattr(self, "_loader_states", []), []
        loaders = self.trainer.train_dataloader
        stateful = [dl for dl in (loaders if isinstance(loaders, list | tuple) else [loaders])
                    if callable(getattr(dl, "load_state_dict", None))]  # fmt: skip
        for loader, state in zip(stateful, states):
            loader.load_state_dict(state)


def random_frozen_backbone_warning(model: PeftModel) -> str | None:
    """The warning for PEFT on a frozen backbone that holds random weights (almost always a forgotten weights
    file), or None: the weights were loaded, or nothing in the backbone stays frozen (full fine-tuning, scratch)."""
    backbone = model.backbone
    if not weights_identity(backbone).is_random or all(p.requires_grad for p in backbone.parameters()):
        return None
    name = getattr(backbone, "name", type(backbone).__name__)
    return (
        f"the frozen backbone {name!r} holds RANDOM weights (no weights file was given: `weights: null`, "
        f"`pretrained: false`), and method {model.method.name!r} keeps it frozen: PEFT on random frozen weights "
        "learns next to nothing. Pass the pretrained weights: --model.init_args.backbone.init_args.weights "
        "PATH (or `pretrained: true` for mmpeft's quickstart backbones). Ignore this only for a deliberate "
        "random-weights baseline"
    )
