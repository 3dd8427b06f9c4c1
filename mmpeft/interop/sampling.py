"""Images out of an adapted denoiser, through diffusers' own pipelines and schedulers.

`PipelineDenoiser` puts a `PeftModel` on a `DiffusersUNet` / `DiffusersDiT` where a pipeline expects its `unet` /
`transformer`: it takes diffusers' call (`sample, timestep, encoder_hidden_states` or `class_labels`) and runs the
model through mmpeft's forward, so every method is live and its forward context holds the timestep, the
conditioning and the sampler's step index (`ctx.step`, what EfficientDM's step-aware quantizers read) exactly as
in training. `build_pipeline` assembles `StableDiffusionPipeline` or `DiTPipeline` around it from a trained
`LatentDiffusion` task (its VAE, its text encoder with any `text_method`, its tokenizer) and a scheduler chosen
by name; `generate` draws one image per (prompt or class, seed) with a generator seeded per image, so the same seed
and adapter give the same image whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import NotSupported

__all__ = ["SCHEDULERS", "GeneratedImage", "PipelineDenoiser", "build_pipeline", "generate", "make_scheduler"]

# name -> (diffusers scheduler class, config overrides), built from the pipeline's own scheduler config
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "ddpm_learned": ("DDPMScheduler", {"variance_type": "learned_range"}),  # a learned-Σ DiT's own variance
    "pndm": ("PNDMScheduler", {}),
}


def make_scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler by name (`SCHEDULERS`), from a scheduler config (the pipeline's own: its betas and
    prediction type stay those the model was trained with)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**dict(config), **overrides})


class PipelineDenoiser(nn.Module):
    """A `PeftModel` on a diffusers denoiser, called the way diffusers' pipelines call a UNet or a DiT.

    The sampler's step index is the scheduler's own `step_index` where it keeps one (the step being taken), else
    the position of the timestep in `scheduler.timesteps`; `scheduler` is set by `build_pipeline`."""

    def __init__(self, model: nn.Module, scheduler: Any = None):
        super().__init__()
        backbone = getattr(model, "backbone", None)
        inner = getattr(backbone, "model", None)
        if inner is None or not hasattr(inner, "config"):
            raise NotSupported(
                f"sampling needs a PeftModel on a diffusers denoiser (DiffusersUNet / DiffusersDiT), got "
                f"{type(backbone or model).__name__}"
            )
        self.model = model
        self.scheduler = scheduler
        self.text_conditioned = getattr(backbone, "family", "") == "unet"
        self._schedule: torch.Tensor | None = None  # the timesteps the method was last told of (`use_schedule`)

    @property
    def config(self) -> Any:
        return self.model.backbone.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.backbone.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.backbone.model.device

    def follow_schedule(self) -> None:
        """Tell the method the sampler's schedule when it changes (`Method.use_schedule`: EfficientDM's per-step
        activation tables read their entries through it)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or (self._schedule is not None and torch.equal(self._schedule, timesteps.cpu())):
            return
        self._schedule = timesteps.detach().cpu().clone()
        self.model.method.use_schedule(self.model.backbone, self._schedule)

    def step_of(self, timestep: torch.Tensor) -> int | None:
        """The index of the step being taken in the scheduler's schedule (None without a scheduler)."""
        if self.scheduler is None:
            return None
        index = getattr(self.scheduler, "step_index", None)
        if index is not None:
            return int(index)
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else torch.tensor(timestep)
        hits = (self.scheduler.timesteps.to(t.device) == t).nonzero()
        return int(hits[0, 0]) if len(hits) else 0

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        cond = encoder_hidden_states if self.text_conditioned else class_labels
        extra = {k: v for k, v in kwargs.items() if v is not None}
        self.follow_schedule()
        out = self.model(BackboneInput(x=sample, timestep=t, cond=cond, step=self.step_of(t), kwargs=extra))
        return _Output(out) if return_dict else (out,)


@dataclass
class _Output:
    """What a diffusers model returns with `return_dict=True`: an object with `.sample`."""

    sample: torch.Tensor


TRAINED_SCHEDULE = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def sampling_config(task: nn.Module) -> dict[str, Any]:
    """The scheduler config to sample with: the pipeline folder's own (its sampling settings such as
    `steps_offset` and `clip_sample`) with the noise schedule and prediction type the task trained with."""
    trained = task.scheduler.config
    return {
        **getattr(task, "pipeline_scheduler_config", {}),
        **{k: trained[k] for k in TRAINED_SCHEDULE if k in trained},
    }


def build_pipeline(task: nn.Module, scheduler: str = "ddim", progress: bool = True) -> Any:
    """diffusers' pipeline around a diffusion task's adapted denoiser: `StableDiffusionPipeline` for a UNet (the
    task's VAE and tokenizer, its text encoder with any `text_method`), `ClassConditionalPipeline` for a DiT (the
    task's VAE if it has one). The scheduler is `scheduler` by name, from the task's own noise schedule."""
    from diffusers import StableDiffusionPipeline

    model = task.model
    sched = make_scheduler(scheduler, sampling_config(task))
    denoiser = PipelineDenoiser(model, sched)
    if denoiser.text_conditioned:
        pipe = StableDiffusionPipeline(
            vae=task.vae,
            text_encoder=model.components["text_encoder"],
            tokenizer=task.tokenizer,
            unet=denoiser,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from mmpeft.interop.class_pipeline import ClassConditionalPipeline

        pipe = ClassConditionalPipeline(transformer=denoiser, scheduler=sched, vae=getattr(task, "vae", None))
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")
    return pipe


@dataclass
class GeneratedImage:
    image: Any  # a PIL image
    seed: int
    prompt: str | None = None
    class_id: int | None = None

    @property
    def label(self) -> str:
        return self.prompt if self.prompt is not None else f"class {self.class_id}"


@torch.no_grad()
def generate(
    pipe: Any,
    seeds: Sequence[int],
    prompts: Sequence[str] = (),
    class_ids: Sequence[int] = (),
    steps: int = 25,
    guidance_scale: float = 7.5,
    size: int | None = None,
    negative_prompt: str | None = None,
) -> list[GeneratedImage]:
    """One image per (prompt or class id, seed), in that order, each from its own `torch.Generator(seed)` (so an
    image depends on its seed alone); the seeds of one prompt run as one batch. `size`: the image side (default:
    the denoiser's own)."""
    if bool(prompts) == bool(class_ids):
        raise ValueError("give prompts (a text-conditioned UNet) or class ids (a class-conditional DiT), one of them")
    text = isinstance(pipe.components.get("unet"), PipelineDenoiser)
    if text != bool(prompts):
        wanted = "prompts" if text else "class ids"
        raise ValueError(f"this model is conditioned on {wanted}; pass {wanted}")
    device = pipe._execution_device if hasattr(pipe, "_execution_device") else torch.device("cpu")
    out = []
    for cond in prompts or class_ids:  # one call per prompt / class: its conditioning is encoded once
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        if text:
            side = {} if size is None else {"height": size, "width": size}
            result = pipe(
                cond, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                num_images_per_prompt=len(seeds), negative_prompt=negative_prompt, **side,
            )  # fmt: skip
            out += [GeneratedImage(im, int(seed), prompt=cond) for im, seed in zip(result.images, seeds)]
        else:
            result = pipe([int(cond)] * len(seeds), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators)  # fmt: skip
            out += [GeneratedImage(im, int(seed), class_id=int(cond)) for im, seed in zip(result.images, seeds)]
    return out


def write_images(images: Sequence[GeneratedImage], out: str | Path, columns: int | None = None) -> Path:
    """Each image as `<out>/<index>-seed<seed>.png` and all of them as `<out>/grid.png` (a row per prompt or
    class, a column per seed, diffusers' `make_image_grid`); returns the grid's path."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(images):
        item.image.save(out / f"{i:03d}-seed{item.seed}.png")
    columns = columns or len({item.seed for item in images})
    rows = -(-len(images) // columns)
    first = images[0].image
    blank = Image.new(first.mode, first.size, "white")  # any mode: RGB, or L for one-channel pixel models
    tiles = [item.image for item in images] + [blank] * (rows * columns - len(images))
    grid = out / "grid.png"
    make_image_grid(tiles, rows=rows, cols=columns).save(grid)
    return grid
