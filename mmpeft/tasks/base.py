"""`PeftTask`: the shared LightningModule. It builds backbone + method + head, the optimizer groups
and the schedule; task families only say how a batch becomes a loss and metrics.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from mmpeft.core.method import method_from_spec
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.core.state import load_adapter
from mmpeft.tasks.optim import build_optimizer, param_groups, warmup_cosine

__all__ = ["PeftTask"]

# Frozen backbones run (partly) in eval mode by design: the frozen-mode policy, not a mistake.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class PeftTask(pl.LightningModule):
    """Base task: a frozen backbone with one PEFT method and a head.

    Args:
        backbone: the frozen backbone (YAML: `class_path` + `init_args`).
        method: a method name (`lora`) or a mapping (`{name: lora, r: 16}`, `{name: ssf, preset: paper}`).
        num_classes: head size; linked from the datamodule by the CLI.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        lr: peak learning rate, reached at the end of warmup.
        weight_decay: on trainable tensors except those the method exempts (1-D tensors and prompts by default).
        warmup_epochs: linear warmup from 0, in epochs (fractions allowed); then cosine to `min_lr`.
        min_lr: the learning rate the cosine ends at.
        grad_checkpointing: recompute each block in backward (token backbones), same gradients.
        adapter: an adapter file to start from (evaluate it, or continue training it).
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: str | dict[str, Any] | None = "linear",
        num_classes: int = 10,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        grad_checkpointing: bool = False,
        adapter: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "text_tower"])
        if grad_checkpointing:
            if not hasattr(backbone, "set_grad_checkpointing"):
                raise ValueError(f"{type(backbone).__name__} does not support activation checkpointing")
            backbone.set_grad_checkpointing(True)
        self.model = PeftModel(backbone, method_from_spec(method), num_classes=num_classes)
        self.strict_loading = False  # checkpoints hold the trainable set only; the frozen rest comes from config
        if adapter:
            self.load_adapter(adapter)

    # -- the method's view -----------------------------------------------------------------------------
    @property
    def method(self):
        return self.model.method

    def load_adapter(self, path: str) -> dict[str, Any]:
        header = load_adapter(self.model, path)
        rank_zero_info(f"loaded adapter {path}")
        return header

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model(inputs)

    def forward_passes(self, inputs: Any) -> list[torch.Tensor]:
        """One output per forward pass the method asks for (MoSA: two, with different experts)."""
        return [self.model(inputs) for _ in range(self.method.forward_passes)]

    # -- what task families implement ---------------------------------------------------------------------
    def loss_and_metrics(self, outputs: list[torch.Tensor], batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        outputs = self.forward_passes(batch[0])
        loss = self.loss_and_metrics(outputs, batch, "train")
        extra = self.method.extra_loss(outputs, batch)
        if extra is not None:
            self.log("train/extra_loss", extra.detach())
            loss = loss + extra
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.loss_and_metrics([self(batch[0])], batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.loss_and_metrics([self(batch[0])], batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        return self(inputs)

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

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, self.method, hp.weight_decay)
        optimizer = build_optimizer(groups, hp.optimizer, hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        factor = warmup_cosine(total, warmup, hp.min_lr / hp.lr if hp.lr else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable set (and trained buffers): frozen weights come from the backbone config."""
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
