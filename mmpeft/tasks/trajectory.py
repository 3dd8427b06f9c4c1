"""The full-precision model's own sampling trajectory: what data-free quantization calibrates and distils on.

EfficientDM (He et al., ICLR 2024) needs no training images: the frozen model (the adapted one run through
`disabled()`, no second copy of the weights) samples with DDIM (η = 1, classifier-free guidance 1.5 in the official
`collect_input_4_calib.py` and `DDIMSampler_trainer`), and each (x_t, t, conditioning) it visits is a training input.
`Trajectory` walks one such path step by step from a seed, so a distillation step, a calibration pass and an
evaluation all see the same inputs, and a run resumed mid-path recomputes its position instead of storing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpeft.core.context import BackboneInput

__all__ = ["Conditions", "Trajectory", "guided_prediction", "ddim_scheduler", "pick"]


@dataclass
class Conditions:
    """The conditioning of one batch and its guidance null (class labels and the null class, or text states and
    the empty prompt's), each [B, ...]."""

    cond: torch.Tensor
    null: torch.Tensor


def ddim_scheduler(config: dict[str, Any], steps: int, device: torch.device | str = "cpu") -> Any:
    """diffusers' DDIM over the model's own noise schedule, set to `steps` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def guided_prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, step: int | None, conditions: Conditions,
                      scale: float) -> torch.Tensor:  # fmt: skip
    """ε_uncond + scale (ε_cond − ε_uncond), the conditional and null halves in one batched call with the sampler's
    step in the forward context (a learned-Σ model's extra channels dropped)."""
    channels = x.shape[1]
    both = torch.cat([x, x])
    timesteps = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(both))
    cond = torch.cat([conditions.cond, conditions.null])
    out = model(BackboneInput(x=both, timestep=timesteps, cond=cond, step=step))[:, :channels]
    eps, eps_null = out.chunk(2)
    return eps_null + scale * (eps - eps_null)


class Trajectory:
    """One DDIM path of the teacher from seeded noise: `x` at `step`, advanced by `advance(eps)` with the teacher's
    guided ε (never the student's); `teacher(model)` gives that ε with every method piece off.

    Args:
        scheduler: a DDIM scheduler set to its steps (`ddim_scheduler`).
        shape: [B, C, H, W] of the latents.
        conditions: the batch's conditioning and its null.
        seed: draws the starting noise and the η noise of every step.
        eta: DDIM's η (1: the official distillation's stochastic path; 0: deterministic).
        guidance_scale: classifier-free guidance of the path (the official 1.5).
    """

    def __init__(self, scheduler: Any, shape: tuple[int, ...], conditions: Conditions, seed: int, eta: float = 1.0,
                 guidance_scale: float = 1.5, device: torch.device | str = "cpu"):  # fmt: skip
        self.scheduler, self.conditions = scheduler, conditions
        self.eta, self.guidance_scale, self.seed = eta, guidance_scale, seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.x = torch.randn(shape, generator=self.generator).to(device) * scheduler.init_noise_sigma
        self.step = 0

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    def prediction(self, model: nn.Module) -> torch.Tensor:
        """`model`'s guided ε at the current point (with autograd as the caller has it)."""
        return guided_prediction(model, self.x, self.timestep, self.step, self.conditions, self.guidance_scale)

    @torch.no_grad()
    def teacher(self, model: nn.Module) -> torch.Tensor:
        """The full-precision model's guided ε: `model` (a PeftModel) with every piece switched off."""
        with model.disabled():
            return self.prediction(model)

    @torch.no_grad()
    def advance(self, eps: torch.Tensor) -> None:
        """One DDIM step with `eps` (the teacher's), η noise from this path's generator."""
        noise = torch.randn(self.x.shape, generator=self.generator).to(self.x.device) if self.eta else None
        out = self.scheduler.step(eps, self.timestep, self.x, eta=self.eta, variance_noise=noise)
        self.x = out.prev_sample
        self.step += 1

    @torch.no_grad()
    def walk_to(self, model: nn.Module, step: int) -> None:
        """Advance with the teacher until `step` (a resumed run's position, recomputed)."""
        while self.step < step:
            self.advance(self.teacher(model))

    @torch.no_grad()
    def visited(self, model: nn.Module) -> list[BackboneInput]:
        """Walk the whole path with the teacher; every point's conditional and null inputs (for calibration)."""
        points = []
        while self.step < self.steps:
            x, t = self.x, self.timestep
            cond = torch.cat([self.conditions.cond, self.conditions.null])
            timesteps = torch.as_tensor(t).reshape(-1).expand(2 * len(x))
            points.append(BackboneInput(x=torch.cat([x, x]), timestep=timesteps, cond=cond))
            self.advance(self.teacher(model))
        return points


def pick(points: list[BackboneInput], count: int, seed: int = 0) -> BackboneInput:
    """`count` samples drawn at random from the visited points (one batch: the calibration pass's)."""
    x = torch.cat([p.x for p in points])
    t = torch.cat([p.timestep for p in points])
    cond = torch.cat([p.cond for p in points])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]
    return BackboneInput(x=x[order], timestep=t[order], cond=cond[order])
