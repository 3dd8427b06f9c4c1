"""Validation you can look at: fixed prompts (or classes) with fixed seeds, sampled through diffusers' pipeline every
N steps and at the end of fit, written as grid PNGs in the run folder and logged as W&B images; the frozen model's
grid is written once, at the start, for comparison.

    <run>/samples/frozen/grid.png    <run>/samples/step-000100/grid.png ...    <run>/samples/final/grid.png

A diffusion task turns it on with its `samples` option (`LatentDiffusion(samples={every_n_steps: 100, ...})`).
Sampling draws from its own seeded generators, so it leaves the training RNG (and an exact resume) untouched.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from mmpeft.tasks.callbacks import run_dir

__all__ = ["SampleGrids"]


class SampleGrids(pl.Callback):
    """Args:
    every_n_steps: sample every this many optimizer steps (0: only at the start and the end of fit).
    prompts / class_ids: what to sample (default: the task's prompt, else the data's `sample_prompts()`, or
        classes 0-3 of a DiT).
    seeds: one image per seed and prompt (a grid row per prompt, a column per seed).
    steps, guidance_scale, scheduler: the sampler (`mmpeft.interop.sampling.SCHEDULERS`).
    frozen: also write the frozen model's grid once, at the start of fit.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        prompts: list[str] | None = None,
        class_ids: list[int] | None = None,
        seeds: list[int] | None = None,
        steps: int = 25,
        guidance_scale: float | None = None,
        scheduler: str = "dpm",
        frozen: bool = True,
    ):
        from mmpeft.interop.sampling import SCHEDULERS

        if every_n_steps < 0 or steps < 1:
            raise ValueError("samples: every_n_steps must be >= 0 and steps >= 1")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"samples: unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if prompts and class_ids:
            raise ValueError("samples: give prompts (a UNet) or class_ids (a DiT), not both")
        self.every_n_steps, self.prompts, self.class_ids = every_n_steps, list(prompts or []), list(class_ids or [])
        self.seeds = list(seeds if seeds is not None else [0, 1])
        self.steps, self.guidance_scale, self.scheduler, self.frozen = steps, guidance_scale, scheduler, frozen
        self.written: list[Path] = []

    def _conditioning(self, trainer: pl.Trainer, task: Any) -> dict[str, list]:
        """The prompts (or classes) to sample: the configured ones, else the task's prompt, else the data's own
        (`sample_prompts()`: DreamBooth's instance prompt, a few validation captions; `sample_class_ids()`: its
        instance class), else a DiT's classes 0-3."""
        if getattr(task, "text_conditioned", False):
            prompts = self.prompts or ([task.prompt] if getattr(task, "prompt", None) else [])
            data = getattr(trainer, "datamodule", None)
            if not prompts and hasattr(data, "sample_prompts"):
                prompts = list(data.sample_prompts())
            if not prompts:
                raise ValueError("samples: neither the task nor the data gives a prompt; set samples.prompts")
            return {"prompts": prompts}
        data_classes = getattr(getattr(trainer, "datamodule", None), "sample_class_ids", list)  # DreamBooth's new class
        classes = self.class_ids or list(data_classes()) or list(range(min(getattr(task, "class_count", None) or 4, 4)))
        return {"class_ids": classes}

    @torch.no_grad()
    def write(self, trainer: pl.Trainer, task: Any, tag: str) -> Path:
        """Sample the grid `tag` into `<run>/samples/<tag>/` and log it to the loggers that take images."""
        from mmpeft.interop.sampling import build_pipeline, generate, write_images

        cond = self._conditioning(trainer, task)
        guidance = self.guidance_scale if self.guidance_scale is not None else (7.5 if "prompts" in cond else 4.0)
        was_training = task.training
        weights = task.evaluation_weights() if tag != "frozen" else contextlib.nullcontext()
        with weights, task.model.disabled() if tag == "frozen" else contextlib.nullcontext():
            pipe = build_pipeline(task.eval(), self.scheduler, progress=False)
            images = generate(pipe, self.seeds, steps=self.steps, guidance_scale=guidance, **cond)
        task.train(was_training)
        grid = write_images(images, run_dir(trainer) / "samples" / tag)
        self.written.append(grid)
        key = "samples/frozen" if tag == "frozen" else "samples/model"
        caption = f"{tag}: {', '.join(map(str, next(iter(cond.values()))))}"
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B (and others that take images)
                from PIL import Image

                with Image.open(grid) as picture:
                    logger.log_image(key=key, images=[picture.copy()], caption=[caption], step=trainer.global_step)
        return grid

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grid = run_dir(trainer) / "samples" / "frozen" / "grid.png"
        if self.frozen and not grid.is_file():  # once per run folder: a resumed run keeps the first
            self.write(trainer, pl_module, "frozen")

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            folder = run_dir(trainer) / "samples" / f"step-{step:06d}"
            if not (folder / "grid.png").is_file():  # gradient accumulation ends several batches on one step
                self.write(trainer, pl_module, f"step-{step:06d}")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module, "final")
