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
from mmpeft.data.checks import DataError
from mmpeft.tasks.base import PeftTask

__all__ = ["Denoising"]


class Denoising(PeftTask):
    """Args (beyond `PeftTask`'s): `num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end` (the
    DDPM schedule; defaults: Stable Diffusion's scaled-linear 0.00085 -> 0.012 over 1000 steps),
    `prediction_type` ("epsilon" or "v_prediction"), `vlb` (add the variational-bound term for
    learned-variance models, as DiT trains).

    Training-loss options of diffusers' example scripts, each off by default and applied to the training loss
    only (`val/loss` stays the plain MSE, so runs with and without them compare):
        snr_gamma: Min-SNR-γ weighting (Hang et al., ICCV 2023): each sample's MSE weighted by
            min(SNR(t), γ) / SNR(t) for ε-prediction, min(SNR(t), γ) / (SNR(t) + 1) for v-prediction, SNR from
            diffusers' `compute_snr`; the paper and diffusers' scripts use γ = 5.
        noise_offset: add `noise_offset * N(0, 1)` per sample and channel to the noise (brighter / darker
            images; diffusers' scripts suggest about 0.1).
        input_perturbation: noise the latents with `noise + input_perturbation * N(0, 1)` while the target stays
            the unperturbed noise (Ning et al., 2023; diffusers' scripts suggest 0.1).

    Prior preservation (DreamBooth, Ruiz et al., CVPR 2023): a batch whose third element marks its class half
    (`DreamBoothDataModule`) trains on L_instance + `prior_loss_weight` * L_prior, each the mean over its half
    (diffusers' DreamBooth scripts; weight 1.0 by default, as there).
    """

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
        vlb: bool = True,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        prior_loss_weight: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.vlb = vlb
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (Min-SNR uses 5) or null (off), got {snr_gamma}")
        if noise_offset < 0 or input_perturbation < 0:
            raise ValueError("noise_offset and input_perturbation are non-negative scales (0: off)")
        self.snr_gamma, self.noise_offset, self.input_perturbation = snr_gamma, noise_offset, input_perturbation
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be non-negative (DreamBooth: 1.0), got {prior_loss_weight}")
        self.prior_loss_weight = prior_loss_weight
        from diffusers import DDPMScheduler

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

    # -- class labels of a class-conditional denoiser (a DiT) ---------------------------------------------------
    @property
    def class_count(self) -> int | None:
        """K when the denoiser is class-conditional (a DiT: labels 0..K-1, row K the CFG null class), else None."""
        return getattr(self.model.backbone, "num_classes", None)

    def label_error(self, found: str) -> DataError:
        k, name = self.class_count, getattr(self.model.backbone, "name", type(self.model.backbone).__name__)
        return DataError(
            f"{found}, but the denoiser {name!r} has num_classes = {k}: its class table holds labels 0..{k - 1}, and "
            f"row {k} is the classifier-free-guidance null class (label {k} would silently train it as a real class; "
            "larger labels have no row). For a new dataset give the backbone a fresh class table with the data's "
            "class count: --model.init_args.backbone.init_args.num_classes=N (it trains with every method); or "
            f"relabel the data to 0..{k - 1}"
        )

    def setup(self, stage: str) -> None:
        """Refuse, before any step, data with more classes than the denoiser's class table holds."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        classes = getattr(datamodule, "num_classes", None)
        if self.class_count is not None and classes and classes > self.class_count:
            raise self.label_error(f"the data has num_classes = {classes} (labels up to {classes - 1})")
        super().setup(stage)

    def check_labels(self, cond: Any) -> None:
        """The per-batch backstop of `setup` (data given without a datamodule): every label in 0..K-1."""
        if self.class_count is None or not isinstance(cond, torch.Tensor) or cond.is_floating_point():
            return
        outside = (cond < 0) | (cond >= self.class_count)
        if bool(outside.any()):
            raise self.label_error(f"a batch holds the labels {sorted(set(cond[outside].tolist()))}")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_batches = 0

    on_test_epoch_start = on_validation_epoch_start

    def encode(self, batch: Any, stage: str) -> tuple[torch.Tensor, Any]:
        """(latents, conditioning) of a batch; here the batch holds them already. `LatentDiffusion` encodes
        images with its VAE and prompts with its text encoder instead."""
        return batch[0], (batch[1] if len(batch) > 1 else None)

    def prepare_batch(self, batch: Any, stage: str) -> tuple[BackboneInput, dict[str, torch.Tensor]]:
        latents, cond = self.encode(batch, stage)
        self.check_labels(cond)
        generator = None
        if stage in ("val", "test"):  # the same noise and timesteps for every evaluation of this batch
            generator = torch.Generator(device=latents.device).manual_seed(10_000 + self._eval_batches)
            self._eval_batches += 1
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if stage == "train" and self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (*latents.shape[:2], *(1,) * (latents.dim() - 2)), device=latents.device, dtype=latents.dtype
            )
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
        noised_with = noise
        if stage == "train" and self.input_perturbation:
            noised_with = noise + self.input_perturbation * torch.randn_like(noise)
        noisy = self.scheduler.add_noise(latents, noised_with, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        targets = {"target": target, "latents": latents, "noisy": noisy, "timesteps": timesteps}
        prior = batch[2] if isinstance(batch, list | tuple) and len(batch) > 2 else None
        if isinstance(prior, torch.Tensor) and prior.dtype == torch.bool and bool(prior.any()):
            targets["prior"] = prior.to(latents.device)
        return BackboneInput(x=noisy, timestep=timesteps, cond=cond), targets

    def loss_and_metrics(self, output: torch.Tensor, targets: Any, stage: str) -> torch.Tensor:
        """MSE on the predicted channels; a learned-variance model (DiT: `out_channels` = 2 x latent channels)
        adds the variational bound of the sampled timestep (see `learned_variance_vlb`)."""
        target = targets["target"] if isinstance(targets, dict) else targets
        channels = target.shape[1]
        weighted = stage == "train" and self.snr_gamma is not None and isinstance(targets, dict)
        prior = targets.get("prior") if isinstance(targets, dict) else None
        if weighted or prior is not None:
            per_sample = F.mse_loss(output[:, :channels].float(), target.float(), reduction="none").flatten(1).mean(1)
            if weighted:
                per_sample = per_sample * self.min_snr_weights(targets["timesteps"])
            if prior is not None:
                prior_loss = per_sample[prior].mean()
                self.log_epoch("prior_loss", prior_loss.detach(), int(prior.sum()), stage)
                loss = per_sample[~prior].mean() + self.prior_loss_weight * prior_loss
            else:
                loss = per_sample.mean()
        else:
            loss = F.mse_loss(output[:, :channels].float(), target.float())
        if output.shape[1] == 2 * channels and isinstance(targets, dict) and self.vlb:
            vlb = learned_variance_vlb(output, targets, self.scheduler).mean()
            self.log_epoch("vlb", vlb.detach(), target.shape[0], stage)
            loss = loss + vlb
        self.log_epoch("loss", loss.detach(), target.shape[0], stage, prog_bar=stage != "train")
        return loss

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ's per-sample loss weights (see the class docstring), SNR from diffusers' `compute_snr`."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = snr.clamp(max=self.snr_gamma)
        return clipped / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else clipped / snr


def _gaussian_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def learned_variance_vlb(output: torch.Tensor, targets: dict[str, torch.Tensor], scheduler: Any) -> torch.Tensor:
    """The variational-bound term of one sampled timestep per sample, in bits per dimension (Nichol &
    Dhariwal, "Improved DDPM", 2021; as DiT trains its learned Σ): KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t))
    with p's mean from the *detached* ε prediction (the bound trains only the variance) and its log-variance
    interpolated between log β_t and the clipped posterior log-variance by the model's extra channels; at
    t = 0 the Gaussian NLL of x_0. Adding it once per sampled t to the MSE is L_simple + λ·L_vlb with
    λ = 1/T = 0.001 for T = 1000, the paper's hybrid loss. Deviation: the t = 0 term is a continuous
    Gaussian NLL (latents are not 8-bit pixels; iDDPM's decoder NLL is discretised)."""
    x0, xt, t = targets["latents"].float(), targets["noisy"].float(), targets["timesteps"]
    channels = x0.shape[1]
    eps, var_values = output[:, :channels].detach().float(), output[:, channels:].float()
    betas = scheduler.betas.to(x0.device, torch.float64)
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, 0)
    cumprod_prev = torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    posterior_var = betas * (1 - cumprod_prev) / (1 - cumprod)
    posterior_logvar = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
    coef1 = betas * cumprod_prev.sqrt() / (1 - cumprod)
    coef2 = (1 - cumprod_prev) * alphas.sqrt() / (1 - cumprod)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    take = lambda table: table[t].float().view(shape)
    true_mean, true_logvar = take(coef1) * x0 + take(coef2) * xt, take(posterior_logvar)
    fraction = (var_values + 1) / 2
    model_logvar = fraction * take(torch.log(betas)) + (1 - fraction) * true_logvar
    pred_x0 = (1 / take(cumprod)).sqrt() * xt - (1 / take(cumprod) - 1).sqrt() * eps
    model_mean = take(coef1) * pred_x0 + take(coef2) * xt
    log2 = torch.log(torch.tensor(2.0, device=x0.device))
    kl = _gaussian_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / log2
    nll = 0.5 * (
        model_logvar + (x0 - model_mean) ** 2 * torch.exp(-model_logvar) + torch.log(2 * torch.pi * x0.new_ones(1))
    )
    nll = nll.flatten(1).mean(1) / log2
    return torch.where(t == 0, nll, kl)
