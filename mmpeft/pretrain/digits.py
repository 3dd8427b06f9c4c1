"""The digits ViT's upstream pretraining: full training on all ten upright digits, through the same
training step as every other run (`mmpeft.tasks.step`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmpeft.backbones.digits import DigitsViT
from mmpeft.core.model import PeftModel
from mmpeft.data.digits import DigitsDataModule
from mmpeft.tasks.optim import build_optimizer, param_groups, warmup_cosine
from mmpeft.tasks.step import fit_steps

__all__ = ["pretrain_digits_vit"]


def pretrain_digits_vit(path: Path, recipe: dict[str, Any], arch: dict[str, Any], progress: bool = True) -> dict:
    """Train a DigitsViT from scratch on the upstream digits and write its backbone weights to `path`
    (atomically); returns the upstream validation accuracy, the time taken, the recipe and the arch."""
    torch.manual_seed(recipe["seed"])
    model = PeftModel(DigitsViT(pretrained=False), "full", num_classes=10)
    data = DigitsDataModule("upstream", batch_size=recipe["batch_size"], seed=recipe["seed"], train_fraction=0.9,
                            val_fraction=0.1)  # fmt: skip
    train = data.train_dataloader()
    optimizer = build_optimizer(param_groups(model, model.method, recipe["weight_decay"]), "adamw", recipe["lr"])
    steps = recipe["epochs"] * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, recipe["warmup_epochs"] * len(train)))
    start = time.perf_counter()
    bar = tqdm(range(recipe["epochs"]), desc="pretraining the digits ViT (upstream)", disable=not progress)
    for _ in bar:
        losses = fit_steps(model, train, optimizer, model.backbone.example_loss, scheduler)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    info = {"upstream_val_acc": correct / total, "seconds": round(time.perf_counter() - start, 1),
            "recipe": recipe, "arch": arch}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(model.backbone.state_dict(), tmp, metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return info
