"""`ClassConditionalPipeline`: one thin pipeline of ours for class-conditional DiTs, where diffusers' `DiTPipeline`
does not fit (imported lazily by `mmpeft.interop.sampling`, as diffusers itself is)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from torch import nn

__all__ = ["ClassConditionalPipeline"]


class ClassConditionalPipeline(DiffusionPipeline):
    """A class-conditional DiT sampled through diffusers' scheduler loop (`set_timesteps`,
    `scale_model_input`, `step`), latent (with a VAE) or in pixel space (`vae=None`).

    Why not `DiTPipeline`: its guidance uses class 1000 as the null class, which is right only for the
    ImageNet DiT (an mmpeft DiT with K classes has its null row at K), it always decodes with a VAE, and
    it drops learned Σ. Here the null class is the model's own (`num_embeds_ada_norm`), and learned Σ is
    kept for a scheduler that uses it (`DDPMScheduler(variance_type="learned_range")`)."""

    def __init__(self, transformer: nn.Module, scheduler: Any, vae: nn.Module | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> Any:
        config = self.transformer.config
        device, dtype = self._execution_device, self.transformer.dtype
        labels = torch.as_tensor(list(class_labels), device=device)
        channels, side = config.in_channels, config.sample_size
        from diffusers.utils.torch_utils import randn_tensor  # a generator per sample, as diffusers' pipelines

        x = randn_tensor((len(labels), channels, side, side), generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        guided = guidance_scale > 1
        null = torch.full_like(labels, int(config.num_embeds_ada_norm))
        keep_sigma = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = self.transformer(model_in, t, class_labels=torch.cat([labels, null]) if guided else labels)
            out = out.sample
            eps, rest = out[:, :channels], out[:, channels:]
            if guided:  # on ε only; Σ (when learned) from the conditional half, as DiT samples
                cond, uncond = eps.chunk(2)
                eps, rest = uncond + guidance_scale * (cond - uncond), rest.chunk(2)[0]
            out = torch.cat([eps, rest], 1) if keep_sigma and rest.shape[1] else eps
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        images = (x / 2 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(images) if output_type == "pil" else images)
