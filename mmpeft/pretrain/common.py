"""The upstream pretraining every quickstart backbone shares: full training of a fresh backbone and head
on the upstream task through the same training step as every other run (`mmpeft.tasks.step`), then
the backbone's weights written atomically with what made them.

The pretraining runs under a fixed torch thread count (`fixed_threads`, the recipe's `threads`, restored
afterwards): a CPU matmul or reduction splits its work by thread count and rounds differently for each
split, and over thousands of steps that rounding grows into other weights (the shapes backbone pretrained at
1 and at 2 threads differed after two epochs, 0.405 against 0.670 upstream val acc). So the cached weights
are the same whatever the machine's default thread count, given the same torch build and CPU instruction set
(another build or ISA may pick other kernels).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmpeft.core.errors import MmpeftError
from mmpeft.core.model import PeftModel
from mmpeft.tasks.optim import build_optimizer, param_groups, warmup_cosine
from mmpeft.tasks.step import fit_steps

__all__ = ["pretrain_classifier", "train_from_scratch", "save_backbone", "fixed_threads", "PretrainingStopped"]


class PretrainingStopped(MmpeftError):
    """SIGTERM during a quickstart backbone's pretraining: nothing was cached; exit 143 like a stopped run."""

    exit_code = 143


@contextlib.contextmanager
def _sigterm_stops(desc: str, where: dict[str, Any]) -> Iterator[None]:
    """Inside, SIGTERM raises `PretrainingStopped` naming what stopped and where (`where`: epoch, epochs), so
    the process says so in one line instead of vanishing (the pretraining runs before Lightning's own handler
    exists). Signals can only be handled in the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise PretrainingStopped(
            f"terminated by SIGTERM while {desc} (epoch {where['epoch']} of {where['epochs']}); nothing was cached, "
            "so the next run that needs this backbone pretrains it from the start"
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside, restored on exit (see the module docstring)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_from_scratch(model: PeftModel, train: Any, loss_fn: Any, recipe: dict[str, Any], desc: str,
                       progress: bool = True, batches: Any = None) -> float:  # fmt: skip
    """Train `model` (a fresh backbone with method "full") on the `train` loader with AdamW, warmup then cosine
    (`recipe`: epochs, lr, weight_decay, warmup_epochs); `batches(loader)` turns a loader's batches into
    (inputs, targets) when they are not already. Returns the seconds it took."""
    optimizer = build_optimizer(param_groups(model, model.method, recipe["weight_decay"]), "adamw", recipe["lr"])
    steps = recipe["epochs"] * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, recipe["warmup_epochs"] * len(train)))
    start = time.perf_counter()
    where = {"epoch": 1, "epochs": recipe["epochs"]}
    with _sigterm_stops(desc, where):  # before the bar: a SIGTERM right after it prints is handled too
        bar = tqdm(range(recipe["epochs"]), desc=desc, disable=not progress)
        for epoch in bar:
            where["epoch"] = epoch + 1
            losses = fit_steps(model, batches(train) if batches else train, optimizer, loss_fn, scheduler)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return time.perf_counter() - start


def save_backbone(model: PeftModel, path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write the backbone's weights to `path` atomically, with `info` (what made them) as metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(model.backbone.state_dict(), tmp, metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return info


def pretrain_classifier(model: PeftModel, data: pl.LightningDataModule, path: Path, recipe: dict[str, Any],
                        arch: dict[str, Any], desc: str, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train `model` (a fresh backbone with method "full" and a head) on `data`'s train split
    (`train_from_scratch`); write the backbone's weights to `path` with the upstream validation accuracy, the
    time, the recipe and the arch as metadata."""
    seconds = train_from_scratch(model, data.train_dataloader(), model.backbone.example_loss, recipe, desc, progress)
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in data.val_dataloader():
            correct += int((model(inputs).argmax(-1) == labels).sum())
            total += len(labels)
    info = {"upstream_val_acc": correct / total, "seconds": round(seconds, 1), "recipe": recipe, "arch": arch}
    return save_backbone(model, path, info)
