"""diffusers denoisers as mmpeft backbones: the shared wrapper and a Stable Diffusion `UNet2DConditionModel`
(the DiT is `mmpeft.backbones.dit`, loading `mmpeft.backbones.diffusers_files`).

The denoiser alone is the backbone; the VAE, the text encoder and the noise schedule belong to the
diffusion task. The diffusers model lives in `self.model` with its own keys, so a merged model saves
back with `backbone.model.save_pretrained(...)`. Methods reach it by module name (`to_q`,
`resnets.0.conv2`, ...); token methods refuse it (diffusers owns the blocks).

Each forward takes a `BackboneInput(x=noisy latents, timestep=[B], cond=text states or class
labels, step=sampler index)` and makes it the forward's context, so pieces attached anywhere can
read `self.context.timestep` / `.step` / `.cond`. Activation checkpointing — ours
(`set_grad_checkpointing`) or diffusers' own (`model.enable_gradient_checkpointing()`) — recomputes
each block with the context it first ran with.

Weights come from a local diffusers-layout folder (a pipeline folder with `unet/` or `transformer/`,
or the model folder itself), or a `.safetensors` / `.bin` file with `config.json` beside it. An
original single-file checkpoint (CompVis / facebookresearch layout) is refused with the command
that converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.backbones.diffusers_files import DTYPES, load_denoiser, load_pretrained, model_class, require_files
from mmpeft.backbones.registry import register_backbone, register_backbone_prefix
from mmpeft.backbones.tiny_diffusers import SMALL_SD_UNET, TINY_DIT, TINY_SD_UNET
from mmpeft.core.backbone import Backbone, register_foreign_backbone
from mmpeft.core.context import BackboneInput, ContextSlot, ForwardContext, checkpoint_in_context
from mmpeft.core.errors import NotSupported, UnknownName
from mmpeft.core.identity import record_weights

__all__ = [
    "DiffusersDenoiser",
    "DiffusersUNet",
    "TINY_SD_UNET",
    "TINY_DIT",
    "load_denoiser",
    "load_pretrained",
    "require_files",
]


def _scaled_linear_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """Stable Diffusion's training schedule (scaled-linear betas 0.00085 -> 0.012), for example batches."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class _CheckpointInContext:
    """A diffusers `_gradient_checkpointing_func` that recomputes a block in its forward's context."""

    def __init__(self, inner: Any, slot: ContextSlot):
        self.inner, self.slot = inner, slot

    def __call__(self, block: Any, *args: Any) -> Any:
        ctx = self.slot.current
        if ctx is None:
            return self.inner(block, *args)
        return checkpoint_in_context(self.slot, ctx, block, *args, checkpoint_fn=self.inner)


def _default_checkpoint(block: Any, *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


class DiffusersDenoiser(Backbone):
    """Base of the diffusers wrappers (see the module docstring). Build from exactly one of
    `source` (a local folder or weights file, or a shipped config's name), `config` (a diffusers config
    dict, or the name of a shipped one such as "tiny_sd_unet": random weights) or `model` (an already
    built diffusers model, shared, not copied).

    Args:
        dtype: "float32", "float16" or "bfloat16" for the frozen weights (method tensors stay fp32
            unless the method's `param_dtype` says otherwise).
        device: build on this device ("meta": parameter counts without memory).
        example_size / example_tokens: latent side and conditioning length of `example_batch`
            (defaults: the config's `sample_size`, 77 text tokens).
    """

    class_name: ClassVar[str] = ""
    subfolder: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    shipped_configs: ClassVar[dict[str, dict[str, Any]]] = {}
    num_features = 0

    def __init__(
        self,
        source: str | None = None,
        config: dict[str, Any] | str | None = None,
        model: nn.Module | None = None,
        name: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        example_size: int | None = None,
        example_tokens: int = 77,
    ):
        super().__init__()
        if isinstance(source, str) and source in self.shipped_configs and config is None:
            source, config = None, source  # `source: tiny_dit` = the shipped config (one key to override in YAML)
        if sum(x is not None for x in (source, config, model)) != 1:
            raise ValueError(
                f"{type(self).__name__} needs exactly one of source=FOLDER_OR_FILE, config={{...}}, model="
            )
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype] if dtype else None
        if isinstance(config, str):  # a shipped config by name (YAML: `config: tiny_sd_unet`)
            if config not in self.shipped_configs:
                shipped = ", ".join(self.shipped_configs)
                raise UnknownName(
                    f"no shipped config {config!r} for {type(self).__name__}; shipped: {shipped} (or pass a mapping)"
                )
            name, config = name or config, self.shipped_configs[config]
        given = model is not None
        self.built_from_config = model is None and config is not None  # random weights mmpeft draws itself
        if self.built_from_config:
            cls = model_class(self.class_name)
            with torch.device(device or "cpu"):
                model = cls.from_config(config)
        elif model is None:  # loaded as stored: the weights' identity is taken before the dtype cast
            model = load_denoiser(self.class_name, self.subfolder, source, None, device)
        if not isinstance(model, model_class(self.class_name)):
            raise NotSupported(f"{type(self).__name__} wraps a {self.class_name}, got {type(model).__name__}")
        self.model = model.requires_grad_(False)
        if not given:  # a model handed in is fingerprinted when a PeftModel is built on it
            record_weights(self, source)
        if torch_dtype is not None:
            self.model.to(torch_dtype)
        self.name = name or (f"{self.prefix}:{Path(source).name}" if source else self.prefix)
        self.example_size = example_size or _side(self.model.config.sample_size)
        self.example_tokens = example_tokens

    @property
    def token_anatomy(self) -> str:
        return f"a diffusers {self.class_name}: diffusers owns its blocks; methods reach its layers by name"

    @property
    def config(self) -> Any:
        return self.model.config

    # -- the forward ---------------------------------------------------------------------------------
    def forward_in_context(self, inputs: BackboneInput, ctx: ForwardContext) -> torch.Tensor:
        if inputs.timestep is None:
            raise ValueError(
                f"{type(self).__name__} is a denoiser: call it with BackboneInput(x=latents, timestep=[B] tensor, "
                "cond=...), not a bare tensor"
            )
        if torch.is_grad_enabled():
            self._checkpoint_in_context()
        out = self.call_model(inputs)
        return out.sample if hasattr(out, "sample") else out[0]

    def call_model(self, inputs: BackboneInput) -> Any:
        raise NotImplementedError

    def _checkpoint_in_context(self) -> None:
        """Make every checkpointing diffusers block recompute in its forward's context (also when the user
        turned diffusers' checkpointing on directly)."""
        for module in self.model.modules():
            inner = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and not isinstance(inner, _CheckpointInContext):
                module._gradient_checkpointing_func = _CheckpointInContext(
                    inner or _default_checkpoint, self.context_slot
                )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each diffusers block in backward (same gradients, less memory)."""
        if enable:
            self.model.enable_gradient_checkpointing()
            self._checkpoint_in_context()
        else:
            self.model.disable_gradient_checkpointing()

    # -- examples for params / bench / tests -------------------------------------------------------------
    def example_cond(self, batch: int, generator: torch.Generator | None) -> Any:
        raise NotImplementedError

    def example_batch(
        self, batch: int, generator: torch.Generator | None = None, num_classes: int | None = None
    ) -> tuple[BackboneInput, torch.Tensor]:
        """Noisy latents at random timesteps (SD's schedule), conditioning, and the noise as the target."""
        channels, side = self.model.config.in_channels, self.example_size
        clean = torch.randn(batch, channels, side, side, generator=generator)
        noise = torch.randn(batch, channels, side, side, generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator)
        alpha = _scaled_linear_alphas_cumprod()[timestep].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        dtype = next(self.model.parameters()).dtype
        cond = self.example_cond(batch, generator)
        cond = cond.to(dtype) if cond.is_floating_point() else cond
        return BackboneInput(x=noisy.to(dtype), timestep=timestep, cond=cond), noise

    def example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Noise-prediction MSE (a learned-variance model's extra channels are not part of it)."""
        return F.mse_loss(outputs[:, : targets.shape[1]].float(), targets.to(outputs.device).float())


def _side(sample_size: Any) -> int:
    return int(sample_size[0] if isinstance(sample_size, list | tuple) else sample_size)


class DiffusersUNet(DiffusersDenoiser):
    """A Stable Diffusion `UNet2DConditionModel`; `cond` is the text encoder's hidden states [B, L, D].

    Registered names: `diffusers_unet:<local folder or file>`, and `tiny_sd_unet` (the (32, 64) UNet
    of diffusers' tests, random weights, for CPU tests and smoke runs).
    """

    family = "unet"
    class_name = "UNet2DConditionModel"
    subfolder = "unet"
    prefix = "diffusers_unet"
    shipped_configs = {"tiny_sd_unet": TINY_SD_UNET, "small_sd_unet": SMALL_SD_UNET}

    def call_model(self, inputs: BackboneInput) -> Any:
        return self.model(inputs.x, inputs.timestep, encoder_hidden_states=inputs.cond, **inputs.kwargs)

    def example_cond(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        width = self.model.config.cross_attention_dim
        width = width[0] if isinstance(width, list | tuple) else width
        return torch.randn(batch, self.example_tokens, width, generator=generator)


def diffusers_source(prefix: str, source: str) -> str:
    """The local folder or file of a `<prefix>:<source>` name, refusing an empty one."""
    if not source:
        raise UnknownName(
            f"{prefix} backbones are named '{prefix}:<local folder or weights file>', got {prefix + ':'!r}"
        )
    return source


@register_backbone_prefix("diffusers_unet", usage="diffusers_unet:<path>", family=DiffusersUNet.family)
def diffusers_unet(source: str, **kwargs: Any) -> DiffusersUNet:
    """a Stable Diffusion UNet2DConditionModel from a local diffusers folder or weights file"""
    return DiffusersUNet(source=diffusers_source("diffusers_unet", source), **kwargs)


@register_backbone("tiny_sd_unet", family=DiffusersUNet.family, takes_weights=False)
def tiny_sd_unet(**kwargs: Any) -> DiffusersUNet:
    """diffusers' (32, 64) test UNet (1,427,012 parameters), random weights, for tests and smoke runs"""
    return DiffusersUNet(config=TINY_SD_UNET, name="tiny_sd_unet", **kwargs)


# a raw diffusers UNet handed to PeftModel is wrapped
register_foreign_backbone("UNet2DConditionModel", "mmpeft.backbones.diffusion:DiffusersUNet")
