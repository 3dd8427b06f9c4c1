"""Denoising: noise-prediction training of a denoiser backbone (a UNet, a DiT) on latents.

A batch is `(latents, cond)` (`cond`: text-encoder states, class labels, or anything the backbone
takes). The task draws noise and timesteps, noises the latents on a DDPM schedule (diffusers'
`DDPMScheduler`, Stable Diffusion's by default) and hands the backbone a `BackboneInput`; the loss is
the MSE between the prediction and the noise (or the velocity, for `prediction_type="v_prediction"`).
Validation and test draw their noise from a generator seeded per batch, so `val/loss` compares runs.
The VAE and text encoder of a full pipeline are the Diffusion I issue's; this task takes latents.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.core.context import BackboneInput
from mmpeft.tasks.base import PeftTask

__all__ = ["Denoising"]


class Denoising(PeftTask):
    """Args (beyond `PeftTask`'s): `num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end` (the
    DDPM schedule; defaults: Stable Diffusion's scaled-linear 0.00085 -> 0.012 over 1000 steps),
    `prediction_type` ("epsilon" or "v_prediction")."""

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        *args: Any,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        from diffusers import DDPMScheduler  # noqa: PLC0415

        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
        )
        self._eval_batches = 0

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_batches = 0

    on_test_epoch_start = on_validation_epoch_start

    def prepare_batch(self, batch: Any, stage: str) -> tuple[BackboneInput, torch.Tensor]:
        latents, cond = batch[0], (batch[1] if len(batch) > 1 else None)
        generator = None
        if stage in ("val", "test"):  # the same noise and timesteps for every evaluation of this batch
            generator = torch.Generator(device=latents.device).manual_seed(10_000 + self._eval_batches)
            self._eval_batches += 1
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return BackboneInput(x=noisy, timestep=timesteps, cond=cond), target

    def loss_and_metrics(self, output: torch.Tensor, targets: torch.Tensor, stage: str) -> torch.Tensor:
        """MSE on the predicted channels (a learned-variance model's extra channels are not part of it)."""
        loss = F.mse_loss(output[:, : targets.shape[1]].float(), targets.float())
        self.log_epoch("loss", loss.detach(), targets.shape[0], stage, prog_bar=stage != "train")
        return loss
