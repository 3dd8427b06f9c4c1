"""Writing an mmpeft LoRA as a diffusers LoRA file, through diffusers' own writer (`save_lora_weights`, and
`convert_state_dict_to_diffusers` for diffusers' key names); the format: `mmpeft.interop.diffusers_lora`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.model import PeftModel
from mmpeft.interop.lora_format import (
    FORMAT,
    KEY_STYLES,
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    TEXT_ENCODER,
    file_key_name,
    unet_backbone,
)

__all__ = ["diffusers_lora_layers", "diffusers_lora_state_dict", "export_diffusers_lora", "exported_components"]


def _lora_factors(piece: nn.Module, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A LoRA piece's (A, (alpha / r) B) as trained, and its own dtype."""
    delta = piece.deltas["all"]
    return delta.A.detach().float(), delta.B.detach().float() * delta.scale, delta.A.dtype


def _svfit_factors(piece: nn.Module, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """SVFit as LoRA (its update is exactly rank r): A = diag(sigma - sigma0) V_r^T, B = U_r (a Conv2d: A the k x k
    conv of V_r^T rows, B the 1 x 1 conv of U_r, as peft's LoRA conv)."""
    spectrum = piece.spectra["all"]
    shift = spectrum.sigma.detach().double() - spectrum.sigma0.double()
    a = shift[:, None] * spectrum.Vh.double()  # [r, in * kh * kw]
    b = spectrum.U.double()  # [out, r]
    if isinstance(host, nn.Conv2d):
        a, b = a.view(spectrum.rank, *host.weight.shape[1:]), b[:, :, None, None]
    return a, b, host.weight.dtype


def _low_rank_layers(method: str, root: nn.Module, what: str, dtype: torch.dtype | None, name_of=None):
    """`{name}.lora_A.weight` = A and `.lora_B.weight` = B (peft's names, the layer's path in `root`) for every
    piece of the low-rank `method` on `root`: the layers dict diffusers' `save_lora_weights` takes per component."""
    from mmpeft.core.modules import adapter_modules
    from mmpeft.methods.lora import LoRADelta
    from mmpeft.methods.svfit import SVFitDelta

    piece_type, factors = {"lora": (LoRADelta, _lora_factors), "svfit": (SVFitDelta, _svfit_factors)}[method]
    label = {"lora": "LoRA", "svfit": "SVFit"}[method]
    out: dict[str, torch.Tensor] = {}
    for name, piece in adapter_modules(root):
        if not isinstance(piece, piece_type):
            continue
        host_name = name.rpartition(".")[0]
        host = root.get_submodule(host_name)
        if piece.parts:
            raise NotSupported(f"{label} on parts {piece.parts} of a fused qkv ({host_name!r}) has no diffusers form")
        if isinstance(host, nn.Conv2d) and host.dilation != (1, 1):
            raise NotSupported(f"{host_name!r} is a dilated Conv2d; peft's LoRA conv has no dilation")
        a, b, own = factors(piece, host)
        key = name_of(host_name) if name_of else host_name
        out[f"{key}.lora_A.weight"] = a.to("cpu", dtype or own).contiguous()
        out[f"{key}.lora_B.weight"] = b.to("cpu", dtype or own).contiguous()
    if not out:
        raise NotSupported(f"the model's {what} carries no {label} pieces (was the method unloaded?)")
    return out


def _layers_of(method: Any, root: nn.Module, what: str, dtype: torch.dtype | None, name_of=None):
    """The layers dict of a low-rank method: LoRA as trained, SVFit as its exact rank-r LoRA."""
    return _low_rank_layers(method.name, root, what, dtype, name_of)


LOW_RANK = ("lora", "svfit")  # the methods a diffusers LoRA file holds exactly


def exported_components(model: PeftModel, text_encoder: str = "include") -> dict[str, Any]:
    """{component name: its LoRA / SVFit method} of the components a diffusers file holds beside the UNet's.

    `text_encoder="include"`: the text encoder's LoRA, and a refusal for anything a file would leave out (a
    text method other than LoRA: the file would load into a pipeline that differs from the trained model);
    "ignore": none (the UNet part alone, the caller's explicit choice)."""
    if text_encoder not in ("include", "ignore"):
        raise ValueError(f"text_encoder must be 'include' or 'ignore', got {text_encoder!r}")
    methods = dict(getattr(model, "component_methods", {}))
    if text_encoder == "ignore":
        return {}
    for name, method in methods.items():
        if name != TEXT_ENCODER or method.name not in LOW_RANK:
            what = f"the {name} carries {method.name!r}" if name == TEXT_ENCODER else f"component {name!r}"
            raise NotSupported(
                f"{what}, which has no diffusers LoRA form (a diffusers file holds LoRA on the UNet and the "
                f"{TEXT_ENCODER}); a file with the UNet's LoRA alone would load into a pipeline that differs from "
                "the trained model, so none is written. The mmpeft adapter file holds the whole model; "
                "text_encoder='ignore' (--text-encoder ignore) writes the UNet part alone"
            )
    return methods


def diffusers_lora_layers(
    model: PeftModel, key_style: str = "peft", dtype: torch.dtype | None = None, text_encoder: str = "include"
) -> dict[str, dict[str, torch.Tensor]]:
    """{component ("unet", "text_encoder"): its layers dict}, what diffusers' `save_lora_weights` takes as
    `unet_lora_layers` / `text_encoder_lora_layers`: peft's `lora_A` / `lora_B` names, or with
    `key_style="diffusers"` those names through diffusers' own `convert_state_dict_to_diffusers` (what its
    DreamBooth LoRA script writes). LoRA is written as trained, SVFit as its exact rank-r LoRA. Refusals: a
    model that is not LoRA / SVFit on a `DiffusersUNet`, and a text method a file would leave out
    (`exported_components`)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {list(KEY_STYLES)}, got {key_style!r}")
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_diffusers_lora takes a PeftModel, got {type(model).__name__}")
    backbone = unet_backbone(model, "export_diffusers_lora")
    if model.method.name not in LOW_RANK:
        raise NotSupported(
            f"export_diffusers_lora writes LoRA files, from LoRA or SVFit (an exact rank-r update); the model's "
            f"method is {model.method.name!r}, which has no low-rank form: `mmpeft export --format diffusers` "
            "writes the merged UNet as a diffusers folder instead"
        )
    layers = {"unet": _layers_of(model.method, backbone.model, "unet", dtype)}
    for name, method in exported_components(model, text_encoder).items():
        encoder = model.components[name]
        layers[name] = _layers_of(method, encoder, name, dtype, lambda n, e=encoder: file_key_name(e, n))
    if key_style == "diffusers":
        layers = {name: convert_state_dict_to_diffusers(part) for name, part in layers.items()}
        kept = [f"{name}.{k.removesuffix('.lora_A.weight')}" for name, part in layers.items() for k in part
                if k.endswith(".lora_A.weight")]  # fmt: skip
        if kept:
            raise NotSupported(
                f"key_style='diffusers' names LoRA keys as diffusers' convert_state_dict_to_diffusers does, and it "
                f"renames only the attention projections; {len(kept)} adapted layer(s) keep peft's names "
                f"({kept[0]}, ...), and diffusers loads such a mixed file only in part. Use key_style='peft' "
                "(--key-style peft), which every current diffusers reads whole"
            )
    return layers


def diffusers_lora_state_dict(
    model: PeftModel,
    key_style: str = "peft",
    prefix: str = "unet",
    dtype: torch.dtype | None = None,
    text_encoder: str = "include",
) -> dict[str, torch.Tensor]:
    """The tensors `export_diffusers_lora` writes, with the file's keys: `{prefix}.{module}.lora_A.weight` = A and
    `.lora_B.weight` = (alpha / r) B per adapted Linear / Conv2d of the UNet, and `text_encoder.text_model.
    {module}...` per adapted layer of the text encoder (see the module docstring and `exported_components`)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    layers = diffusers_lora_layers(model, key_style=key_style, dtype=dtype, text_encoder=text_encoder)
    out: dict[str, torch.Tensor] = {}
    for name, part in layers.items():
        out |= StableDiffusionLoraLoaderMixin.pack_weights(part, prefix if name == "unet" else name)
    return out


def export_diffusers_lora(
    model: PeftModel,
    path: str | os.PathLike,
    weight_name: str = LORA_WEIGHT_NAME,
    key_style: str = "peft",
    dtype: torch.dtype | None = None,
    text_encoder: str = "include",
) -> Path:
    """Write the model's LoRA (on a `DiffusersUNet`, and on its text encoder when it has one) as a diffusers LoRA
    file with diffusers' own writer (`StableDiffusionLoraLoaderMixin.save_lora_weights`); returns its path.

    `path` is a folder (the file is `path/weight_name`, what `pipe.load_lora_weights(path)` finds) or a
    `.safetensors` file. `key_style`: "peft" (`lora_A` / `lora_B`) or "diffusers" (diffusers'
    `convert_state_dict_to_diffusers`, as its DreamBooth script). `dtype`: of the written tensors (default: the
    LoRA's own). The scale alpha / r is folded into B; the method configs go into the header (see the module
    docstring). `text_encoder`: "include" (a text method that is not LoRA is refused) or "ignore" (the UNet part
    alone, recorded in the header as `left_out`). The file is written whole or not at all.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import save_file

    from mmpeft.core.model import backbone_signature

    layers = diffusers_lora_layers(model, key_style=key_style, dtype=dtype, text_encoder=text_encoder)
    components = exported_components(model, text_encoder)
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / weight_name
    if file.parent.is_file():
        raise NotADirectoryError(f"{file.parent} is a file; give export_diffusers_lora a folder or a .safetensors path")
    config = lambda m: {"name": m.name, "config": json.loads(json.dumps(m.config()))}
    header = {
        "format": FORMAT,
        "method": config(model.method),
        "components": {name: config(m) for name, m in components.items()},
        "left_out": sorted(set(getattr(model, "component_methods", {})) - set(components)),
        "scale_in_B": True,
        "backbone": backbone_signature(model.backbone),
    }

    def save_whole(tensors: dict[str, torch.Tensor], filename: str) -> None:
        """diffusers' `save_function`: its default writer's `format` entry plus our header, via a temporary file,
        so a failed export never leaves a half-written file where a good one stood."""
        tmp = Path(filename).with_name(Path(filename).name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
            os.replace(tmp, filename)
        finally:
            if tmp.exists():
                tmp.unlink()

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=file.parent,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get(TEXT_ENCODER),
        weight_name=file.name,
        save_function=save_whole,
    )
    return file
