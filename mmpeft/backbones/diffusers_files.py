"""Reading diffusers models from local folders and files: the layout checks, the refusal of original
single-file checkpoints (with the command that converts them) and the shipped tiny pipeline's folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import NotSupported, WeightsUnavailable

__all__ = ["DTYPES", "load_denoiser", "model_class", "load_pretrained", "require_files"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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


def model_class(class_name: str) -> type[nn.Module]:
    import diffusers  # keeps `import mmpeft` light

    return getattr(diffusers, class_name)


def _refuse_single_file(path: Path, class_name: str, why: str) -> None:
    raise WeightsUnavailable(f"{str(path)!r} {why}: an original single-file checkpoint, not a diffusers model; "
                             f"{_CONVERT[class_name]}")  # fmt: skip


def _state_dict_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="meta", weights_only=True))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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
    cls = model_class(class_name)
    if str(source) == "tiny_sd":  # the shipped tiny SD pipeline (random weights), built once and cached
        from mmpeft.backbones.tiny_diffusers import tiny_sd_folder

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
