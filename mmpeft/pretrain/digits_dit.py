"""The digits DiT's upstream pretraining: class-conditional noise prediction on all ten upright digits, in pixels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.core.context import BackboneInput
from mmpeft.core.model import PeftModel
from mmpeft.data.digits import DigitsDataModule
from mmpeft.pretrain.common import fixed_threads, save_backbone, train_from_scratch

__all__ = ["pretrain_digits_dit", "noised"]


def noised(batches: Any, scheduler: Any, generator: torch.Generator | None = None) -> Iterator[tuple]:
    """(BackboneInput(noisy images, timesteps, labels), noise) per (images, labels) batch: DDPM's training pairs."""
    for images, labels in batches:
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
        yield BackboneInput(x=scheduler.add_noise(images, noise, t), timestep=t, cond=labels), noise


def pretrain_digits_dit(path: Path, recipe: dict[str, Any], arch: dict[str, Any], progress: bool = True) -> dict:
    """Train a DigitsDiT from scratch on the upstream digits and write its weights to `path`, with the upstream
    validation loss (fixed noise) as metadata."""
    from diffusers import DDPMScheduler

    from mmpeft.backbones.digits_dit import DIGITS_SCHEDULE, DigitsDiT

    with fixed_threads(recipe["threads"]):
        torch.manual_seed(recipe["seed"])
        model = PeftModel(DigitsDiT(pretrained=False), "full")
        scheduler = DDPMScheduler(**DIGITS_SCHEDULE)
        data = DigitsDataModule("upstream", batch_size=recipe["batch_size"], seed=recipe["seed"], train_fraction=0.9,
                                val_fraction=0.1, shift=0)  # fmt: skip
        data.setup("fit")
        desc = "pretraining the digits DiT (upstream)"
        loss = F.mse_loss
        seconds = train_from_scratch(model, data.train_dataloader(), loss, recipe, desc, progress,
                                     batches=lambda loader: noised(loader, scheduler))  # fmt: skip
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses = [float(loss(model(x), n)) for x, n in noised(data.val_dataloader(), scheduler, g)]
        info = {"upstream_val_loss": sum(losses) / len(losses), "seconds": round(seconds, 1), "recipe": recipe,
                "arch": arch}  # fmt: skip
        return save_backbone(model, path, info)
