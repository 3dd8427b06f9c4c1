"""Latent diffusion on images: Stable Diffusion (text-conditioned UNet) and DiT (class-conditional).

The denoiser is the backbone and carries the method; the VAE and the text encoder come from the same
local diffusers pipeline folder (or the shipped tiny one, `pipeline: tiny_sd`) and stay frozen. The text
encoder may carry a method of its own (`text_method`, diffusers' `--train_text_encoder`), saved in the
same adapter file under `components.text_encoder.`. Because both encoders are frozen, the VAE's latent
distribution of each training image and the text states of each prompt are computed once and cached
(`cache`; a `mmpeft.core.cache.ContentCache` each, the mechanism the cached linear probe shares); latents
are sampled from the cached distribution at every step, as diffusers' cached-latents training does, and
evaluation uses the distribution's mean. The scheduler is the pipeline's own (prediction type ε or v),
and a learned-Σ DiT adds the variational bound (see `Denoising`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from mmpeft.backbones.diffusers_files import load_pretrained, require_files
from mmpeft.core.cache import ContentCache
from mmpeft.core.errors import NotSupported, WeightsUnavailable
from mmpeft.tasks.denoising import Denoising
from mmpeft.tasks.sample_grids import SampleGrids

__all__ = ["LatentDiffusion", "TeacherSource", "pipeline_folder"]

CALIBRATION_BATCH = 4  # conditionings on the calibration path (each visited point gives a conditional and a null)

PRIOR_CHUNK = 8  # class images made per pipeline call (one generator each: the same images as one at a time)


def prior_chunks(targets: list[tuple[int, Any, Path]]) -> list[tuple[Any, list[tuple[int, Path]]]]:
    """(prompt or label, up to PRIOR_CHUNK (seed, file) pairs) per pipeline call: the targets grouped by their
    conditioning, so one call encodes it once and batches its seeds."""
    groups: dict[Any, list[tuple[int, Path]]] = {}
    for seed, cond, path in targets:
        groups.setdefault(cond, []).append((seed, path))
    return [(cond, pairs[i : i + PRIOR_CHUNK]) for cond, pairs in groups.items()
            for i in range(0, len(pairs), PRIOR_CHUNK)]  # fmt: skip


def pipeline_folder(pipeline: str) -> Path:
    """A local diffusers pipeline folder; "tiny_sd" builds (once, cached) the random tiny SD pipeline. The parts
    every latent-diffusion run reads (the VAE's config and weights, the scheduler's config) must be there; the
    text parts are checked where a text-conditioned run reads them (`LatentDiffusion`)."""
    if pipeline == "tiny_sd":
        from mmpeft.backbones.tiny_diffusers import tiny_sd_folder

        return Path(tiny_sd_folder())
    folder = Path(pipeline).expanduser()
    if not (folder / "model_index.json").is_file() and not (folder / "vae").is_dir():
        raise WeightsUnavailable(
            f"{str(folder)!r} is not a diffusers pipeline folder (expected model_index.json and vae/, "
            "text_encoder/, tokenizer/, scheduler/ inside); pass a local pipeline folder or 'tiny_sd'"
        )
    require_files(folder / "scheduler", "diffusers scheduler", ("scheduler_config.json",))
    return folder


def load_tokenizer(folder: Path) -> Any:
    """The pipeline's CLIP tokenizer (`tokenizer/`: vocab.json + merges.txt, or a tokenizer.json)."""
    from transformers import CLIPTokenizer

    require_files(folder, "CLIP tokenizer", ("vocab.json", "merges.txt"), ("tokenizer.json",))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


class LatentDiffusion(Denoising):
    """Args (beyond `Denoising`'s): `pipeline` (a local diffusers pipeline folder, or "tiny_sd"; null: pixel space,
    no VAE, the noise schedule from this task's own arguments, for a class-conditional DiT such as `digits_dit`),
    `prompt` (one prompt for every image, DreamBooth's instance prompt; else batches carry captions, or
    class labels for a DiT), `text_method` (a method on the text encoder), `cache` (cache latents and
    text states of the frozen encoders), `attention` ("auto": xformers on CUDA when its kernels load,
    else SDPA; "sdpa"; "xformers"), `adapter` (as PeftTask's; loaded after the text encoder is added, so a
    file with a `text_method` part loads whole), `samples` (grids of fixed prompts / classes and seeds every N
    steps, at the end, and of the frozen model once: `{every_n_steps: 100, prompts: [...], seeds: [0, 1]}`, see
    `mmpeft.tasks.sample_grids.SampleGrids`). Batches are (images in [-1, 1], captions or labels)."""

    def __init__(
        self,
        *args: Any,
        pipeline: str | None = "tiny_sd",
        prompt: str | None = None,
        text_method: str | dict[str, Any] | None = None,
        cache: bool = True,
        attention: str = "auto",
        adapter: str | None = None,
        samples: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        from diffusers import AutoencoderKL, DDPMScheduler

        kwargs["num_classes"] = None  # a denoiser has no head, whatever classes the image folder has
        folder = pipeline_folder(pipeline) if pipeline is not None else None
        config = DDPMScheduler.load_config(str(folder), subfolder="scheduler") if folder else {}
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            if key in config:
                kwargs.setdefault(key, config[key])
        super().__init__(*args, adapter=None, **kwargs)  # `adapter` loads below, once the text encoder exists
        self.pipeline_scheduler_config = dict(config)  # the sampling defaults (steps_offset, clip_sample, ...)
        self.prompt, self.cache = prompt, cache
        self.text_conditioned = getattr(self.model.backbone, "family", "") == "unet"
        if folder is None and self.text_conditioned:
            raise ValueError("pipeline: null (pixel space) is for a class-conditional DiT; a text-conditioned UNet "
                             "needs its pipeline folder's VAE, tokenizer and text encoder")  # fmt: skip
        self.vae = load_pretrained(AutoencoderKL, folder / "vae").eval().requires_grad_(False) if folder else None
        if self.text_conditioned:
            from transformers import CLIPTextModel

            self.tokenizer = load_tokenizer(folder / "tokenizer")
            encoder = load_pretrained(CLIPTextModel, folder / "text_encoder")
            self.model.add_component("text_encoder", encoder, text_method)  # the EMA, started at setup, covers it
        elif text_method is not None:
            raise ValueError("text_method needs a text-conditioned UNet; a DiT is conditioned on class labels")
        if adapter:
            self.load_adapter(adapter)
        self._latent_cache = ContentCache("VAE latent")  # the one cache mechanism (mmpeft.core.cache)
        self._text_cache = ContentCache("text-encoder state")
        self.attention = attention
        self._sample_grids = SampleGrids(**samples) if samples else None  # checked now, not at the end of fit

    def setup(self, stage: str) -> None:
        """diffusers' own attention processors: xformers when its kernels load on CUDA, SDPA otherwise (the
        method's tensors live in Linear modules, so a processor swap keeps them)."""
        from mmpeft.backbones.diffusers_attention import use_fast_attention

        if stage == "predict":
            raise NotSupported(
                "`mmpeft predict` returns a model's outputs for a data split; a diffusion model's images come from "
                "sampling: mmpeft sample --run RUN_FOLDER --prompt '...' (or -c CONFIG --adapter FILE; --class-ids "
                "for a DiT)"
            )
        super().setup(stage)
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self.attention_backend = use_fast_attention(self.model.backbone, self.attention, device=device)

    def configure_callbacks(self) -> list:
        """`samples` adds the sample-grid callback (`mmpeft.tasks.sample_grids`) to whatever trainer runs this task."""
        grids = [self._sample_grids] if self._sample_grids is not None else []
        return [*super().configure_callbacks(), *grids]

    def on_fit_end(self) -> None:
        """A LoRA on a UNet is also written as `diffusers_lora/pytorch_lora_weights.safetensors`, the file
        `StableDiffusionPipeline.load_lora_weights` takes, with the text encoder's LoRA when `text_method` is one.
        A text method with no diffusers LoRA form gets no file (rather than one that loads into a pipeline that
        differs from the trained model), and a warning says why."""
        if self.method.name == "efficientdm" and self.trainer.is_global_zero and self.trainer.loggers:  # a run folder
            self.write_int_model()
        if self.method.name not in ("lora", "svfit") or not self.text_conditioned or not self.trainer.is_global_zero:
            return
        from mmpeft.interop.diffusers_lora import export_diffusers_lora, exported_components
        from mmpeft.tasks.callbacks import run_dir

        try:
            exported_components(self.model)
        except NotSupported as err:
            rank_zero_warn(f"no diffusers LoRA file written: {err}")
            return
        with self.evaluation_weights():
            path = export_diffusers_lora(self.model, run_dir(self.trainer) / "diffusers_lora")
        text = " (UNet and text encoder)" if "text_encoder" in getattr(self.model, "component_methods", {}) else ""
        self.print(f"diffusers LoRA file{text}: {path}")

    def write_int_model(self) -> None:
        """EfficientDM's deployable form beside the adapter: `int_model.safetensors`, the packed integer denoiser
        (`mmpeft.interop.int_export`), which `mmpeft sample --int-model` samples from."""
        from mmpeft.interop.int_export import export_int
        from mmpeft.tasks.callbacks import run_dir

        with self.evaluation_weights():
            path = export_int(self.model, run_dir(self.trainer) / "int_model.safetensors")
        self.print(f"integer model: {path} ({path.stat().st_size / 1024:.1f} KB)")

    @torch.no_grad()
    def generate_prior_images(self, data: Any) -> None:
        """Prior preservation's class images (`DreamBoothDataModule`), the missing ones only: sampled from the frozen
        model (every method switched off through `disabled()`, no second copy of the weights) with diffusers'
        pipeline, each from its own seed, and recorded in the folder's provenance file for later runs."""
        import contextlib
        import json

        from mmpeft.core.identity import weights_identity
        from mmpeft.core.pristine import disabled
        from mmpeft.data.dreambooth import PROVENANCE
        from mmpeft.interop.sampling import build_pipeline, generate

        fingerprint = weights_identity(self.model.backbone).fingerprint() or "unknown"
        seeds = data.missing_class_images(fingerprint)
        if not seeds:
            return
        hp, folder = data.hparams, data.class_dir
        folder.mkdir(parents=True, exist_ok=True)
        if self._trainer is not None:
            self.to(self.trainer.strategy.root_device)
        of = f"of classes {hp.prior_classes}" if data.labelled else f"of {hp.class_prompt!r}"
        self.print(f"prior preservation: generating {len(seeds)} class images {of} in {folder}")
        was_training = self.training
        with contextlib.ExitStack() as off:
            off.enter_context(self.model.disabled())
            for name in getattr(self.model, "component_methods", {}):
                off.enter_context(disabled(self.model.components[name]))
            pipe = build_pipeline(self.eval(), "dpm").to(self.device)
            for cond, chunk in prior_chunks(data.prior_targets(seeds)):  # an interrupted run keeps what it wrote
                kind = {"class_ids": [cond]} if data.labelled else {"prompts": [cond], "size": hp.image_size}
                images = generate(pipe, [s for s, _ in chunk], **kind, steps=hp.class_steps,
                                  guidance_scale=hp.class_guidance_scale)  # fmt: skip
                for image, (_, path) in zip(images, chunk, strict=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.image.save(path)
                (folder / PROVENANCE).write_text(json.dumps(data.prior_provenance(fingerprint), indent=1))
        self.train(was_training)

    # -- the teacher's own trajectory (data-free calibration and distillation: `mmpeft.tasks.trajectory`) ------------
    def method_data(self, datamodule: Any) -> Any:
        """The datamodule, plus `teacher_inputs` (what EfficientDM calibrates on)."""
        return TeacherSource(self, datamodule)

    def teacher_prompts(self, datamodule: Any = None) -> list[str]:
        """The prompts a text-conditioned teacher samples for data-free work: the instance prompt (`prompt`, or the
        DreamBooth data's); refused when there is none."""
        hp = getattr(datamodule, "hparams", {})
        prompt = self.prompt or (hp.get("instance_prompt") if hasattr(hp, "get") else None)
        if not prompt:
            raise ValueError("sampling the teacher's trajectory on a text-conditioned UNet needs prompts: set the "
                             "task's prompt (--model.init_args.prompt 'a photo of sks dog')")  # fmt: skip
        return [prompt]

    def teacher_conditions(self, count: int, generator: torch.Generator, prompts: list[str] | None = None) -> Any:
        """`count` conditionings drawn for the teacher (random classes, or `prompts`), with their guidance nulls."""
        from mmpeft.tasks.trajectory import Conditions

        if self.text_conditioned:
            prompts = prompts or self.teacher_prompts()
            chosen = [prompts[int(i)] for i in torch.randint(len(prompts), (count,), generator=generator)]
            with torch.no_grad():
                return Conditions(self._text_states(chosen), self._text_states([""] * count))
        labels = torch.randint(0, self.class_count, (count,), generator=generator).to(self.device)
        return Conditions(labels, torch.full_like(labels, self.class_count))

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        backbone = self.model.backbone
        return (batch, backbone.model.config.in_channels, backbone.example_size, backbone.example_size)

    def teacher_trajectory(self, steps: int, batch: int, seed: int, eta: float = 1.0, guidance_scale: float = 1.5,
                           prompts: list[str] | None = None) -> Any:  # fmt: skip
        """A `Trajectory` of the full-precision model: DDIM over this task's noise schedule, `steps` steps, `batch`
        conditionings drawn from `seed`."""
        from mmpeft.interop.sampling import sampling_config
        from mmpeft.tasks.trajectory import Trajectory, ddim_scheduler

        scheduler = ddim_scheduler(sampling_config(self), steps, self.device)
        conditions = self.teacher_conditions(batch, torch.Generator().manual_seed(seed), prompts)
        return Trajectory(scheduler, self.latent_shape(batch), conditions, seed, eta, guidance_scale, self.device)

    @property
    def text_encoder(self) -> nn.Module:
        return self.model.components["text_encoder"]

    # -- encoders ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _latent_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior, scaled to the denoiser's latent space, cached per image; in pixel
        space (no VAE) the images themselves, with no spread."""
        if self.vae is None:
            return images, torch.zeros_like(images)

        def encode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = self.vae.encode(batch.to(self.vae.dtype)).latent_dist
            scale = self.vae.config.scaling_factor
            return dist.mean * scale, dist.std * scale

        if not self.cache:
            return encode(images)
        return self._latent_cache.get_or_compute(images, encode)  # only the images not cached are encoded, one by one

    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        frozen = "text_encoder" not in getattr(self.model, "component_methods", {})

        def encode(batch: list[str]) -> torch.Tensor:
            ids = self.tokenizer(batch, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
                return self.text_encoder(ids)[0]

        if not (frozen and self.cache):
            return encode(prompts)
        return self._text_cache.get_or_compute(prompts, encode)  # prompts are their own keys

    def encode(self, batch: Any, stage: str) -> tuple[torch.Tensor, Any]:
        images, conditioning = batch[0], batch[1]
        mean, std = self._latent_distribution(images)
        latents = mean if stage in ("val", "test") else mean + std * torch.randn_like(std)
        if not self.text_conditioned:
            return latents, conditioning  # class labels
        prompts = [self.prompt] * len(images) if self.prompt is not None else list(conditioning)
        if not all(isinstance(p, str) for p in prompts):
            from mmpeft.data.checks import DataError

            raise DataError(
                f"prompt: null takes each image's prompt from the data, but this data module gives "
                f"{type(prompts[0]).__name__} labels, not captions; set the instance prompt "
                "(--model.init_args.prompt 'a photo of sks dog'), or use a data module with captions "
                "(CaptionedImagesDataModule: metadata.jsonl; DreamBoothDataModule: instance / class prompts)"
            )
        return latents, self._text_states(prompts)


class TeacherSource:
    """A diffusion run's datamodule with its teacher's trajectory: `teacher_inputs(count, steps)` is `count` inputs
    drawn from one DDIM path (η = 1, guidance 1.5, as EfficientDM collects its calibration set) of `steps` steps,
    with that schedule's timesteps (the tables' entries belong to them)."""

    def __init__(self, task: LatentDiffusion, datamodule: Any):
        self.task, self.datamodule = task, datamodule

    def __getattr__(self, name: str) -> Any:  # the datamodule's own attributes
        return getattr(self.__dict__["datamodule"], name)

    def teacher_inputs(self, count: int, steps: int, seed: int = 0) -> tuple[Any, torch.Tensor]:
        from mmpeft.tasks.trajectory import pick

        prompts = self.task.teacher_prompts(self.datamodule) if self.task.text_conditioned else None
        path = self.task.teacher_trajectory(steps, CALIBRATION_BATCH, seed, prompts=prompts)
        return pick(path.visited(self.task.model), count, seed), path.scheduler.timesteps.cpu()
