"""diffusers denoisers as mmpeft backbones: a Stable Diffusion `UNet2DConditionModel` and a
`DiTTransformer2DModel`.

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

import copy
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.backbone import Backbone
from mmpeft.core.context import BackboneInput, ContextSlot, ForwardContext, checkpoint_in_context
from mmpeft.core.errors import NotSupported, UnknownName, WeightsUnavailable
from mmpeft.core.identity import record_weights

__all__ = [
    "DiffusersDenoiser",
    "DiffusersUNet",
    "DiffusersDiT",
    "TINY_SD_UNET",
    "TINY_DIT",
    "load_denoiser",
    "load_pretrained",
    "require_files",
]

# The (32, 64) UNet of diffusers' SD LoRA tests: 1,427,012 parameters; LoRA r=4 on q, k, v, out: 23,040.
TINY_SD_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
}
# diffusers' DiT pipeline test config, with 10 classes (plus the CFG null class) instead of 1000.
TINY_DIT: dict[str, Any] = {
    "sample_size": 16,
    "num_layers": 2,
    "patch_size": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "in_channels": 4,
    "out_channels": 8,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}

CLASS_TABLE = "class_embedder.embedding_table.weight"  # a diffusers DiT's class table (the original's `y_embedder`)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ORIGINAL_KEYS = {
    "UNet2DConditionModel": ("model.diffusion_model.", "input_blocks.", "first_stage_model."),
    "DiTTransformer2DModel": ("x_embedder.", "t_embedder.", "y_embedder.", "model.x_embedder."),
}
# Class names older diffusers saved a model under, and the config entry that identifies it: diffusers
# itself remaps these (facebook/DiT-XL-2-*'s transformer/config.json still says Transformer2DModel).
_LEGACY_NAMES: dict[str, tuple[str, str, str]] = {
    "DiTTransformer2DModel": ("Transformer2DModel", "norm_type", "ada_norm_zero"),
}
_CONVERT = {
    "UNet2DConditionModel": (
        "convert it once into a diffusers folder, e.g. `StableDiffusionPipeline.from_single_file(PATH)"
        ".save_pretrained(OUT)` or diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py "
        "--checkpoint_path PATH --dump_path OUT, then pass OUT"
    ),
    "DiTTransformer2DModel": (
        "convert it once into a diffusers folder with diffusers' scripts/convert_dit_to_diffusers.py "
        "(or load it with DiTPipeline and save_pretrained), then pass that folder"
    ),
}


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


def _model_class(class_name: str) -> type[nn.Module]:
    import diffusers  # noqa: PLC0415 - keeps `import mmpeft` light

    return getattr(diffusers, class_name)


def _refuse_single_file(path: Path, class_name: str, why: str) -> None:
    raise WeightsUnavailable(f"{str(path)!r} {why}: an original single-file checkpoint, not a diffusers model; "
                             f"{_CONVERT[class_name]}")  # fmt: skip


def _state_dict_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="meta", weights_only=True))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_folder(folder: Path, class_name: str, subfolder: str) -> Path:
    """The folder holding the model's config.json: the pipeline's `unet/` / `transformer/`, or `folder`."""
    for candidate in (folder / subfolder, folder):
        if (candidate / "config.json").is_file():
            config = json.loads((candidate / "config.json").read_text())
            found = config.get("_class_name")
            legacy = _LEGACY_NAMES.get(class_name)
            is_legacy = legacy is not None and found == legacy[0] and config.get(legacy[1]) == legacy[2]
            if found and found != class_name and not is_legacy:
                raise NotSupported(f"{str(candidate)!r} holds a {found}, not a {class_name}")
            return candidate
    singles = sorted(p.name for p in folder.glob("*") if p.suffix in (".ckpt", ".safetensors", ".pt", ".pth"))
    hint = (
        f"; it holds {singles}: if that is an original single-file checkpoint, {_CONVERT[class_name]}"
        if singles
        else ""
    )
    raise WeightsUnavailable(
        f"{str(folder)!r} is not a diffusers {class_name} folder: expected {folder}/{subfolder}/config.json (a "
        f"pipeline folder) or {folder}/config.json with diffusion_pytorch_model.safetensors beside it{hint}"
    )


# The weights files `from_pretrained` looks for (each may also be sharded: `<name>.index.json` beside its shards).
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def require_files(folder: Path, what: str, *alternatives: tuple[str, ...]) -> None:
    """Refuse `folder` unless it holds every file of at least one of `alternatives`, naming the folder, what it
    should be and what it holds (diffusers' and transformers' own errors name a file deep in a fallback chain)."""
    if any(all((folder / name).is_file() for name in names) for names in alternatives):
        return
    expected = " or ".join(" + ".join(names) for names in alternatives)
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    found = f"it holds {held}" if held is not None else "it does not exist"
    raise WeightsUnavailable(f"{str(folder)!r} is not a complete {what} folder: expected {expected}; {found}")


def load_pretrained(cls: type[nn.Module], folder: str | Path, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained(folder)` for a diffusers or transformers model folder, refused with the folder's name
    and what is missing or mismatched when its config.json and weights do not make one model. Left to the
    libraries, a config without weights fails in jsonargparse as "Does not validate against any of the Union
    subtypes", and a config beside another model's weights (a UNet's config, a VAE's weights) loads with its
    tensors left on the meta device, to fail later with "Cannot copy out of meta tensor"."""
    folder = Path(folder)
    names = TRANSFORMERS_WEIGHTS if cls.__module__.startswith("transformers") else DIFFUSERS_WEIGHTS
    weights = [(n,) for n in names] + [(f"{n}.index.json",) for n in names]
    require_files(folder, f"{cls.__name__} (config.json and its weights)", ("config.json",))
    require_files(folder, f"{cls.__name__} (config.json and its weights)", *weights)
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    except ValueError as err:  # diffusers: a tensor of another shape than the config makes
        first = (str(err).strip().splitlines() or [""])[0].split(". If you want")[0]
        raise WeightsUnavailable(
            f"{str(folder)!r}: the weights do not fit its config.json ({cls.__name__}): {first}"
        ) from err
    misfit = _misfit(info)
    if misfit:
        raise WeightsUnavailable(
            f"{str(folder)!r}: the weights do not fit its config.json ({cls.__name__}): {misfit}. Are they another "
            f"model's? Put the {cls.__name__}'s own weights beside its config.json"
        )
    return model


def _misfit(info: dict[str, Any]) -> str:
    """What `from_pretrained`'s loading info says is wrong ("" when the weights fit): tensors the model needs
    that the file lacks, or has in another shape, and the file's tensors that belong to no layer."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if not (missing or mismatched):
        return ""
    parts = [
        (missing, f"{len(missing)} of the model's tensors are not in the weights file (e.g. {missing[:3]})"),
        (mismatched, f"{len(mismatched)} have another shape ({mismatched[:2]})"),
        (unexpected, f"{len(unexpected)} in the file belong to no layer of it (e.g. {unexpected[:3]})"),
    ]
    return "; ".join(text for keys, text in parts if keys)


def load_denoiser(
    class_name: str,
    subfolder: str,
    source: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A diffusers model from a local folder or weights file (see the module docstring)."""
    cls = _model_class(class_name)
    if str(source) == "tiny_sd":  # the shipped tiny SD pipeline (random weights), built once and cached
        from mmpeft.interop.tiny_sd import tiny_sd_folder  # noqa: PLC0415

        source = tiny_sd_folder()
    path = Path(source).expanduser()
    if not path.exists():
        looks_like_hub = len(Path(str(source)).parts) == 2 and not str(source).startswith((".", "/", "~"))
        hub = (
            " — it looks like a hub id; no hub is reachable from here: download it on a machine with network "
            "access (huggingface-cli download ID --local-dir DIR) and pass DIR"
        )
        hint = hub if looks_like_hub else ""
        raise WeightsUnavailable(f"no such file or folder: {str(source)!r}{hint}")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth"):
            _refuse_single_file(path, class_name, f"is a {path.suffix} file")
        keys = _state_dict_keys(path)
        if any(k.startswith(_ORIGINAL_KEYS[class_name]) for k in keys):
            _refuse_single_file(path, class_name, "has original-layout keys (e.g. " + keys[0] + ")")
        folder = _model_folder(path.parent, class_name, subfolder)
        with torch.device(device or "cpu"):
            model = cls.from_config(cls.load_config(folder))
        if model.device.type != "meta":
            missing, unexpected = model.load_state_dict(_read_state_dict(path), strict=False)
            if missing or unexpected:
                raise WeightsUnavailable(
                    f"{str(path)!r} does not fit the {class_name} of {folder}/config.json: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        return model.to(dtype) if dtype is not None else model
    folder = _model_folder(path, class_name, subfolder)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
        return model.to(dtype) if dtype is not None else model  # the dtype decides the bytes a meta build reports
    model = load_pretrained(cls, folder, torch_dtype=dtype)
    return model.to(device) if device is not None else model


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
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        torch_dtype = _DTYPES[dtype] if dtype else None
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
            cls = _model_class(self.class_name)
            with torch.device(device or "cpu"):
                model = cls.from_config(config)
        elif model is None:  # loaded as stored: the weights' identity is taken before the dtype cast
            model = load_denoiser(self.class_name, self.subfolder, source, None, device)
        if not isinstance(model, _model_class(self.class_name)):
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
    shipped_configs = {"tiny_sd_unet": TINY_SD_UNET}

    def call_model(self, inputs: BackboneInput) -> Any:
        return self.model(inputs.x, inputs.timestep, encoder_hidden_states=inputs.cond, **inputs.kwargs)

    def example_cond(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        width = self.model.config.cross_attention_dim
        width = width[0] if isinstance(width, list | tuple) else width
        return torch.randn(batch, self.example_tokens, width, generator=generator)


class TiedEmbedding(nn.Module):
    """Block k's `norm1.emb` in a tied DiT: runs block 0's timestep MLP and class table (`source`).

    It holds no tensors of its own, so the tied model has one name per tensor (block 0's): counts,
    optimizers, adapter files and state dicts see one copy, as in the original DiT's single `t_embedder`
    / `y_embedder`. `save_pretrained` sets `emit_copies`, and the state dict then also holds block 0's
    tensors (cloned) under this block's keys: the diffusers layout, which expects a copy per block.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a child: block 0's tensors keep their one name
        self.emit_copies = False
        self.register_state_dict_post_hook(_emit_tied_copies)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.source(*args, **kwargs)


def _emit_tied_copies(module: TiedEmbedding, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.emit_copies:
        for key, value in module.source.state_dict().items():
            state_dict[prefix + key] = value.detach().clone()  # separate storage: safetensors refuses shared tensors


class _SaveEveryCopy:
    """`save_pretrained` of a tied diffusers DiT: diffusers' own, with every block's `norm1.emb` written out
    (as separate tensors; safetensors refuses tensors that share memory), so diffusers loads the folder."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tied = [m for m in self.model.modules() if isinstance(m, TiedEmbedding)]
        for m in tied:
            m.emit_copies = True
        try:
            return type(self.model).save_pretrained(self.model, *args, **kwargs)
        finally:
            for m in tied:
                m.emit_copies = False


class DiffusersDiT(DiffusersDenoiser):
    """A class-conditional `DiTTransformer2DModel`; `cond` is the class labels [B].

    Registered names: `diffusers_dit:<local folder or file>`, and `tiny_dit` (diffusers' DiT test
    config with 10 classes, random weights).

    Args (besides the base class's):
        tie_embeddings: diffusers gives every block its own `norm1.emb` (timestep MLP + class table) holding
            the same values, where the original DiT has one `t_embedder` / `y_embedder`: 27 redundant copies,
            74,991,744 parameters on DiT-XL/2 (749,826,464 -> 674,834,720), 32,288,256 of them class tables.
            True (default) makes every block run block 0's copy (`TiedEmbedding`, in place on a `model` passed
            in; the final layer already reads block 0's), so methods that train the table or the timestep
            biases train one copy, as in the paper. Loaded weights whose copies differ (a randomly initialised
            model saved as is) are kept untied, with a warning, rather than silently changed; a model built
            from `config` or a shipped config's name (`source: tiny_dit`), or on the meta device (no values to
            compare), is tied by construction (block 0's random draws). `model.save_pretrained(...)` still
            writes every block's copy, so the folder loads in plain diffusers.
        num_classes: a fresh class table for a new dataset: K classes plus the classifier-free-guidance null
            row (diffusers' `LabelEmbedding` convention, K+1 rows; the null label is K), initialised as
            diffusers initialises it (`nn.Embedding`'s N(0, 1); the original DiT code uses N(0, 0.02)), with
            the config's `num_embeds_ada_norm` set to K so a saved model reloads. Untied, every block gets
            a copy of the same table. The fresh table is the task's (`task_owned`): it trains under every
            method and is saved in the adapter file.
    """

    family = "dit"
    class_name = "DiTTransformer2DModel"
    subfolder = "transformer"
    prefix = "diffusers_dit"
    shipped_configs = {"tiny_dit": TINY_DIT}

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
        tie_embeddings: bool = True,
        num_classes: int | None = None,
    ):
        super().__init__(source, config, model, name, dtype, device, example_size, example_tokens)
        self.fresh_class_table = num_classes is not None
        if num_classes is not None:
            self._fresh_class_table(num_classes)
        if tie_embeddings and len(self.model.transformer_blocks) > 1:
            differ = [] if self.built_from_config else _differing_copies(self.model)
            if differ:
                warnings.warn(untied_warning(self.name, differ), stacklevel=2)
            else:
                tie_dit_embeddings(self.model)

    def task_owned(self) -> list[str]:
        """A fresh class table (`num_classes`; every block's copy when untied): it belongs to the new dataset, not
        to the pretrained model, so it trains under every method (LoRA, SVFit, BitFit as well as DiffFit), counts as
        trainable and goes in the adapter file, as a classifier's head does."""
        if not self.fresh_class_table:
            return []
        return [n for n, _ in self.named_parameters() if n.endswith(CLASS_TABLE)]

    @property
    def num_classes(self) -> int:
        """K: the class table holds labels 0..K-1; its row K (diffusers' K+1-row `LabelEmbedding`) is the
        classifier-free-guidance null class, which training drops labels to and sampling guides against."""
        return int(self.model.config.num_embeds_ada_norm)

    @property
    def tied(self) -> bool:
        return any(isinstance(m, TiedEmbedding) for m in self.model.modules())

    def _fresh_class_table(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        blocks = self.model.transformer_blocks
        labels = blocks[0].norm1.emb.class_embedder
        old = labels.embedding_table.weight
        rows = num_classes + int(labels.dropout_prob > 0)  # + the CFG null row
        table = nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype).requires_grad_(False)
        for i, block in enumerate(blocks):
            embedder = block.norm1.emb
            if isinstance(embedder, TiedEmbedding):
                continue
            embedder.class_embedder.embedding_table = table if i == 0 else copy.deepcopy(table)
            embedder.class_embedder.num_classes = num_classes
        self.model.register_to_config(num_embeds_ada_norm=num_classes)

    def call_model(self, inputs: BackboneInput) -> Any:
        return self.model(inputs.x, timestep=inputs.timestep, class_labels=inputs.cond, **inputs.kwargs)

    def example_cond(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randint(0, self.model.config.num_embeds_ada_norm, (batch,), generator=generator)


def untied_warning(name: str, differ: list[int]) -> str:
    """Why a DiT asked to tie stays untied, and what that means for the methods that train its embeddings."""
    blocks = f"{differ[:5]}{'...' if len(differ) > 5 else ''}"
    return (
        f"{name}: the blocks' norm1.emb copies (timestep MLP + class table) differ from block 0's in blocks {blocks} "
        "(a checkpoint converted from DiT has equal copies; these weights look randomly initialised or trained "
        "untied), so they are kept untied: tying would replace them by block 0's and change the model. Methods that "
        "train the class table or the timestep biases (DiffFit, BitFit) then train one copy per block; pass "
        "tie_embeddings=False to say the untied model is meant (this warning then goes)"
    )


def _differing_copies(model: nn.Module) -> list[int]:
    """Blocks whose `norm1.emb` tensors differ from block 0's (none on the meta device: no values to compare)."""
    blocks = model.transformer_blocks
    reference = blocks[0].norm1.emb.state_dict()
    if any(t.device.type == "meta" for t in reference.values()):
        return []
    differ = []
    for i, block in enumerate(blocks):
        if not i or isinstance(block.norm1.emb, TiedEmbedding):  # tied already (a model wrapped twice)
            continue
        state = block.norm1.emb.state_dict()
        if state.keys() != reference.keys() or any(not torch.equal(v, reference[k]) for k, v in state.items()):
            differ.append(i)
    return differ


def tie_dit_embeddings(model: nn.Module) -> None:
    """Make every block of a diffusers DiT run block 0's `norm1.emb` (see `DiffusersDiT`, `tie_embeddings`)."""
    blocks = model.transformer_blocks
    source = blocks[0].norm1.emb
    for block in blocks[1:]:
        if not isinstance(block.norm1.emb, TiedEmbedding):
            block.norm1.emb = TiedEmbedding(source)
    model.save_pretrained = _SaveEveryCopy(model)  # an instance attribute: diffusers' own, writing every copy
