"""mmpeft LoRA <-> diffusers LoRA files (`pytorch_lora_weights.safetensors`) for Stable Diffusion: the UNet's
LoRA and, when the run adapted the text encoder too (`text_method`), the text encoder's.

Export writes what `StableDiffusionPipeline.load_lora_weights(dir)` loads and what diffusers' DreamBooth
LoRA script (`save_lora_weights`) writes; import reads those files, and also the older diffusers layouts
and kohya-ss files that diffusers itself converts, into an mmpeft `LoRA` on a `DiffusersUNet` (and a `LoRA`
on the CLIP text encoder, added as the model's `text_encoder` component).

The file format (peft keys, diffusers >= 0.2x; checked against diffusers 0.42):
  `unet.<module path>.lora_A.weight`  A, [r, in] (a Conv2d: [r, in, kh, kw], peft's k×k "down" conv)
  `unet.<module path>.lora_B.weight`  B, [out, r] (a Conv2d: [out, r, 1, 1])
  `text_encoder.text_model.<module path>.lora_A.weight` / `.lora_B.weight`: the same for the text encoder
where `<module path>` is the layer's name in the `UNet2DConditionModel` (`down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q`) or in the `CLIPTextModel` (`encoder.layers.0.self_attn.q_proj`). The text
encoder's keys carry `text_model.`, transformers 4's nesting of the CLIP text model, which the files in
circulation use; transformers 5 dropped the nesting, and diffusers 0.42 strips the prefix again when its
text encoder has none (`_load_lora_into_text_encoder`), so one spelling loads under both. With
`key_style="diffusers"` the keys go through diffusers' own `convert_state_dict_to_diffusers`, exactly as its
DreamBooth script writes them: the attention projections become `.lora.down.weight` / `.lora.up.weight` (UNet)
and `.lora_linear_layer.down.weight` / `.up.weight` (text encoder), other layers keep peft's names; diffusers
converts them back on load. Export writes through diffusers' `save_lora_weights` (its packing and file name).

Scaling: a file without alphas means `W + B A` to diffusers (peft's `lora_alpha / r` with `lora_alpha = r`
when absent), for the UNet and the text encoder alike. mmpeft's `W + (alpha / r) B A` is therefore written
with the scale folded into B (`lora_B = (alpha / r) B`), which every loader reads the same way (no reliance on
`network_alphas` or on the LoRA-config metadata newer diffusers honour). The mmpeft method configs (the
UNet's and the text encoder's) go into the safetensors header under `mmpeft_lora`, so an import of mmpeft's
own file gives back the same `alpha` and options.

On import, a module's scale is what diffusers would use: the LoRA-config metadata diffusers'
`save_lora_weights(..., unet_lora_adapter_metadata=..., text_encoder_lora_adapter_metadata=...)` writes
(`lora_alpha`, `alpha_pattern`, `rank_pattern`, `use_rslora`), else kohya `network_alphas` (`alpha / r`),
else 1.

Only LoRA has a diffusers LoRA form: a run whose text encoder carries another method (BitFit, DiffFit, ...)
is refused rather than written without it (that file would load into a pipeline that differs from the
trained model); `text_encoder="ignore"` writes the UNet part alone, and says so in the header.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import AdapterMismatch, NotSupported
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules

__all__ = [
    "LORA_WEIGHT_NAME",
    "METADATA_KEY",
    "DiffusersLoRAFile",
    "export_diffusers_lora",
    "diffusers_lora_state_dict",
    "read_diffusers_lora",
    "import_diffusers_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "mmpeft_lora"  # our header entry; diffusers reads only "format" and "lora_adapter_metadata"
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_FORMAT = "mmpeft-diffusers-lora/1"
KEY_STYLES = ("peft", "diffusers")  # peft's lora_A / lora_B names; diffusers' converter's (DreamBooth's files)
_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODER = "text_encoder"  # the component name in mmpeft and the key prefix in diffusers' files
TEXT_MODEL = "text_model."  # transformers 4's CLIPTextModel nesting, as text-encoder LoRA files spell it
_TEXT_MODES = ("error", "ignore", "import")


# -- export --------------------------------------------------------------------------------------------


def _unet_backbone(obj: Any, what: str):
    """The `DiffusersUNet` of a PeftModel / backbone / raw `UNet2DConditionModel`."""
    from mmpeft.backbones.diffusion import DiffusersUNet
    from mmpeft.core.backbone import as_backbone

    backbone = obj.backbone if isinstance(obj, PeftModel) else as_backbone(obj)
    if not isinstance(backbone, DiffusersUNet):
        raise NotSupported(
            f"{what} works on Stable Diffusion UNets (a DiffusersUNet backbone, e.g. tiny_sd_unet or "
            f"diffusers_unet:<folder>), not on {type(backbone).__name__} {getattr(backbone, 'name', '')!r}"
        )
    return backbone


def _lora_pieces(root: nn.Module) -> dict[str, Any]:
    """{host module path in `root`: LoRADelta} for every mmpeft LoRA piece on `root` (a UNet, a text encoder)."""
    from mmpeft.methods.lora import LoRADelta

    pieces = {}
    for name, piece in adapter_modules(root):
        if isinstance(piece, LoRADelta):
            host, _, attr = name.rpartition(".")
            if attr != "lora":
                raise NotSupported(f"unexpected LoRA piece {name!r}: mmpeft attaches LoRA as a host's child 'lora'")
            pieces[host] = piece
    return pieces


def _file_name(text_encoder: nn.Module, module: str) -> str:
    """A text-encoder layer's name as the file spells it (`text_model.` + its path, see the module docstring)."""
    return module if hasattr(text_encoder, "text_model") else TEXT_MODEL + module


def _model_name(text_encoder: nn.Module, name: str) -> str:
    """The inverse of `_file_name`, as diffusers reads it: `text_model.` is dropped where the model has none."""
    return name if hasattr(text_encoder, "text_model") else name.removeprefix(TEXT_MODEL)


def _lora_layers(root: nn.Module, what: str, dtype: torch.dtype | None, name_of=None) -> dict[str, torch.Tensor]:
    """`{name}.lora_A.weight` = A and `.lora_B.weight` = (alpha / r) B (peft's names, the layer's path in `root`)
    for every LoRA piece on `root`: the layers dict diffusers' `save_lora_weights` takes per component."""
    pieces = _lora_pieces(root)
    if not pieces:
        raise NotSupported(f"the model's {what} carries no LoRA pieces (was the method unloaded?)")
    out: dict[str, torch.Tensor] = {}
    for host_name, piece in pieces.items():
        host = root.get_submodule(host_name)
        if piece.parts:
            raise NotSupported(f"LoRA on parts {piece.parts} of a fused qkv ({host_name!r}) has no diffusers form")
        if isinstance(host, nn.Conv2d) and host.dilation != (1, 1):
            raise NotSupported(f"{host_name!r} is a dilated Conv2d; peft's LoRA conv has no dilation")
        delta = piece.deltas["all"]
        a = delta.A.detach().float()
        b = delta.B.detach().float() * delta.scale
        target = dtype or delta.A.dtype
        name = name_of(host_name) if name_of else host_name
        out[f"{name}.lora_A.weight"] = a.to("cpu", target).contiguous()
        out[f"{name}.lora_B.weight"] = b.to("cpu", target).contiguous()
    return out


def exported_components(model: PeftModel, text_encoder: str = "include") -> dict[str, Any]:
    """{component name: its LoRA method} of the components whose LoRA a diffusers file holds beside the UNet's.

    `text_encoder="include"`: the text encoder's LoRA, and a refusal for anything a file would leave out (a
    text method other than LoRA: the file would load into a pipeline that differs from the trained model);
    "ignore": none (the UNet part alone, the caller's explicit choice)."""
    from mmpeft.methods.lora import LoRA

    if text_encoder not in ("include", "ignore"):
        raise ValueError(f"text_encoder must be 'include' or 'ignore', got {text_encoder!r}")
    methods = dict(getattr(model, "component_methods", {}))
    if text_encoder == "ignore":
        return {}
    for name, method in methods.items():
        if name != TEXT_ENCODER or not isinstance(method, LoRA):
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
    DreamBooth LoRA script writes). Refusals: a model that is not a LoRA on a `DiffusersUNet`, and a text method
    a file would leave out (`exported_components`)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from mmpeft.methods.lora import LoRA

    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {list(KEY_STYLES)}, got {key_style!r}")
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_diffusers_lora takes a PeftModel, got {type(model).__name__}")
    backbone = _unet_backbone(model, "export_diffusers_lora")
    if not isinstance(model.method, LoRA):
        hint = (
            " (DiffFit's biases and scales are no low-rank delta: merge the method and save the UNet with "
            "backbone.model.save_pretrained)"
            if model.method.name == "difffit"
            else ""
        )
        raise NotSupported(
            f"export_diffusers_lora writes LoRA files; the model's method is {model.method.name!r}{hint}"
        )
    layers = {"unet": _lora_layers(backbone.model, "unet", dtype)}
    for name in exported_components(model, text_encoder):
        encoder = model.components[name]
        layers[name] = _lora_layers(encoder, name, dtype, lambda n, e=encoder: _file_name(e, n))
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
        "format": _FORMAT,
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


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class DiffusersLoRAFile:
    """A diffusers LoRA file's UNet part (and text-encoder part, when read), in peft terms.

    `modules`: {UNet module path: (A, B, scale)} with the module's delta `scale * B @ A` (B as stored);
    `text_modules`: the same for the text encoder, module paths as the file spells them (`text_model.` kept;
    empty unless read with text_encoder="import"); `skipped`: the prefixes of the file's parts left out;
    `mmpeft`: the header mmpeft wrote (None for files from elsewhere)."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    skipped: list[str] = field(default_factory=list)
    mmpeft: dict[str, Any] | None = None
    text_modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _, _) in self.modules.items()}


def _resolve_file(path: str | os.PathLike, weight_name: str | None) -> Path:
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no LoRA file or folder {str(path)!r}")
    if weight_name:
        file = path / weight_name
        if not file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {weight_name!r}")
        return file
    for name in (LORA_WEIGHT_NAME, "pytorch_lora_weights.bin"):
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return path / found[0]
    raise FileNotFoundError(
        f"{str(path)!r} has no {LORA_WEIGHT_NAME}" + (f"; pass weight_name= one of {found}" if found else "")
    )


def _file_header(file: Path) -> dict[str, str]:
    if file.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _pattern_key(patterns: Any, name: str) -> str | None:
    """peft's `get_pattern_key`: the first pattern that is a dotted suffix (a regex) of `name`."""
    for key in patterns or ():
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _unet_alpha_module(key: str) -> str:
    """The module an alpha belongs to: diffusers' kohya conversion names them after the converted down
    weight (`...attn1.processor.to_q_lora.down.weight.alpha`), older files after the module (`...to_q.alpha`)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    base = key.removesuffix(".alpha")
    converted = next(iter(convert_unet_state_dict_to_peft({base: None})))
    return converted.split(".lora_")[0] if ".lora_" in converted else converted


def _text_alpha_module(key: str) -> str:
    """diffusers' kohya conversion names a text-encoder alpha after its module (`text_model....q_proj.alpha`)."""
    return key.removesuffix(".alpha").split(".lora")[0]


def _unet_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(state)


def _text_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers does to a text-encoder part before loading it (`_load_lora_into_text_encoder`)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


def _scale_of(module: str, rank: int, config: dict[str, Any] | None, alphas: dict[str, float] | None) -> float:
    """The scale diffusers' loader gives `module`: LoRA-config metadata, else network alphas, else 1."""
    if config:
        r_key = _pattern_key(config.get("rank_pattern"), module)
        a_key = _pattern_key(config.get("alpha_pattern"), module)
        r = config["rank_pattern"][r_key] if r_key else config.get("r", rank)
        alpha = config["alpha_pattern"][a_key] if a_key else config.get("lora_alpha", r)
        if r != rank:
            raise AdapterMismatch(f"LoRA file: {module!r} has rank {rank} but the file's LoRA config says {r}")
        return float(alpha) / (r**0.5 if config.get("use_rslora") else r)
    if alphas and module in alphas:
        return float(alphas[module]) / rank
    return 1.0


def _refuse_mmpeft_adapter(file: Path, header: dict[str, str]) -> None:
    """An mmpeft adapter file given where a diffusers LoRA file belongs: say so, and what to do with it."""
    from mmpeft.core.state import FORMAT

    found = header.get("format", "")
    if found.split("/")[0] == FORMAT.split("/")[0]:
        raise AdapterMismatch(
            f"{str(file)!r} is already an mmpeft adapter file (header format {found!r}), not a diffusers LoRA file: "
            f"nothing to import. Use it as it is (--adapter {file}), or write a diffusers file from it with "
            f"`mmpeft export-lora {file} --out <folder> --unet <pipeline>`"
        )


@dataclass
class _Part:
    """One prefix of a LoRA file (`unet`, `text_encoder`) and how diffusers reads it."""

    prefix: str
    to_peft: Any  # the key conversion diffusers applies to files not in peft keys
    alpha_module: Any  # an alpha key -> the module it scales


_UNET = _Part("unet", _unet_to_peft, _unet_alpha_module)
_TEXT = _Part(TEXT_ENCODER, _text_to_peft, _text_alpha_module)


def _part_modules(
    file: Path, part: _Part, state: dict[str, torch.Tensor], alphas: dict[str, Any], meta: dict[str, Any]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scale)} of one part of the file; `state`, `alphas` and `meta` still carry the prefix."""
    dot = f"{part.prefix}."
    state = {k.removeprefix(dot): v for k, v in state.items() if k.startswith(dot)}
    file_alphas = {part.alpha_module(k.removeprefix(dot)): float(v) for k, v in alphas.items() if k.startswith(dot)}
    for key in [k for k in state if k.endswith(".alpha")]:  # alphas stored beside peft keys (kohya style)
        file_alphas[part.alpha_module(key)] = float(state.pop(key))
    config = {k.removeprefix(dot): v for k, v in meta.items() if k.startswith(dot)} or None
    return _modules(file, state, config, file_alphas, part.to_peft)


def _modules(file: Path, state: dict, config: dict | None, alphas: dict[str, float], to_peft) -> dict:
    """Group a part's peft-keyed tensors by module, with each module's scale (see `_scale_of`)."""
    if any(".lora_A." not in k and ".lora_B." not in k for k in state):
        state = to_peft(state)
    refused = [k for k in state if "lora_magnitude_vector" in k or (".lora_B." in k and k.endswith(".bias"))]
    if refused or (config and (config.get("use_dora") or config.get("lora_bias"))):
        raise NotSupported(f"LoRA file {str(file)!r} holds DoRA or LoRA-bias tensors ({refused[:2]}); mmpeft's "
                           "LoRA has neither")  # fmt: skip
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name in sorted({k.split(".lora_")[0] for k in state}):
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        own = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
        others = [k for k in state if k.startswith(name + ".lora_") and k not in own]
        if a is None or b is None or others:
            keys = sorted(k for k in state if k.startswith(name + ".lora_"))
            raise AdapterMismatch(f"LoRA file {str(file)!r}: {name!r} does not have exactly lora_A / lora_B ({keys})")
        if a.shape[0] != b.shape[1]:
            raise AdapterMismatch(f"LoRA file {str(file)!r}: {name!r} has A {list(a.shape)} and B {list(b.shape)}")
        modules[name] = (a, b, _scale_of(name, a.shape[0], config, alphas))
    return modules


def read_diffusers_lora(
    path: str | os.PathLike, weight_name: str | None = None, text_encoder: str = "error"
) -> DiffusersLoRAFile:
    """Read a diffusers LoRA file (or a folder holding `pytorch_lora_weights.safetensors`): its UNet part, and
    its text-encoder part with text_encoder="import".

    Reads what `StableDiffusionPipeline.lora_state_dict` reads (peft keys, `lora.down` / `lora.up`, the
    old attention-processor names, kohya-ss files with alphas). `text_encoder`: "error" refuses a file that
    also adapts a text encoder (an mmpeft UNet model would silently drop it); "ignore" skips that part;
    "import" reads the `text_encoder` part too (`text_encoder_2`, SDXL's second encoder, is refused).
    """
    from diffusers import StableDiffusionPipeline

    if text_encoder not in _TEXT_MODES:
        raise ValueError(f"text_encoder must be one of {_TEXT_MODES}, got {text_encoder!r}")
    file = _resolve_file(path, weight_name)
    raw_header = _file_header(file)
    _refuse_mmpeft_adapter(file, raw_header)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(file), local_files_only=True)[:2]
    meta = json.loads(raw_header[_DIFFUSERS_METADATA_KEY]) if raw_header.get(_DIFFUSERS_METADATA_KEY) else {}
    ours = json.loads(raw_header[METADATA_KEY]) if raw_header.get(METADATA_KEY) else None

    prefixed = any(k.split(".", 1)[0] in _PREFIXES for k in state)
    others = sorted({k.split(".", 1)[0] for k in state if k.split(".", 1)[0] in _PREFIXES} - {"unet"})
    read = {TEXT_ENCODER} if text_encoder == "import" else set()
    refused = [p for p in others if p not in read]
    if refused and text_encoder != "ignore":
        why = "mmpeft reads the text_encoder of SD 1.x / 2.x, not SDXL's second one" if read else (
            "an mmpeft UNet model would leave that part out")  # fmt: skip
        raise NotSupported(
            f"LoRA file {str(file)!r} also adapts {', '.join(refused)} ({why}): pass text_encoder='import' to read "
            "the text encoder's LoRA as well (CLI: --text-encoder import), or text_encoder='ignore' to leave that "
            "part out"
        )
    if not prefixed:  # unet.save_attn_procs files: UNet keys without a prefix
        state = {f"unet.{k}": v for k, v in state.items()}
    alphas = dict(alphas or {})
    modules = _part_modules(file, _UNET, state, alphas, meta)
    if not modules:
        raise AdapterMismatch(f"LoRA file {str(file)!r} has no UNet LoRA tensors")
    text = _part_modules(file, _TEXT, state, alphas, meta) if TEXT_ENCODER in read else {}
    skipped = [p for p in others if p not in read]
    return DiffusersLoRAFile(path=file, modules=modules, skipped=skipped, mmpeft=ours, text_modules=text)


# -- import --------------------------------------------------------------------------------------------


def _targets_for(root: nn.Module, modules: list[str], prefix: str = "model.") -> tuple[str, ...]:
    """The shortest LoRA targets that select exactly `modules` (paths below `root.<prefix>`): the layer names
    (`to_q`, `to_out.0`, `conv2`, `q_proj`) when those pick out the same set, else the full module paths."""
    from mmpeft.core.inject import match_name
    from mmpeft.methods.lora import DENOISER_TARGETS

    wanted = {f"{prefix}{m}" for m in modules}
    short = []
    for m in modules:
        parts = m.split(".")
        cut = 2 if parts[-1].isdigit() and len(parts) > 1 else 1
        short.append(".".join(parts[-cut:]))
    order = {t: i for i, t in enumerate(DENOISER_TARGETS)}
    short = sorted(dict.fromkeys(short), key=lambda s: (order.get(s, len(order)), s))
    named = [n for n, _ in root.named_modules() if n]
    selected = {n for n in named if any(match_name(n, s) for s in short)}
    if selected == wanted and not any(c in s for s in short for c in "*?["):
        return tuple(short)
    return tuple(sorted(modules))


def _selected(root: nn.Module, targets: tuple[str, ...] | None, prefix: str = "model.") -> set[str] | None:
    """Module paths (below `root.<prefix>`) that LoRA `targets` select (None: the UNet default), or None if
    refused."""
    from mmpeft.core.inject import find_modules
    from mmpeft.methods.lora import DEFAULT_TARGETS, parse_target

    if targets is None and prefix != "model.":
        return None  # a text encoder has no default targets
    patterns = [parse_target(t)[0] for t in (targets if targets is not None else DEFAULT_TARGETS["unet"])]
    try:
        found = find_modules(root, patterns, required=targets is not None)
    except (NotSupported, ValueError):
        return None
    return {n.removeprefix(prefix) for n, _ in found}


def _build_method(root: nn.Module, modules: dict[str, tuple], ours: dict[str, Any] | None, prefix: str = "model."):
    """An mmpeft `LoRA` for `modules` on `root`: their rank (the largest one), and, for mmpeft's own files, the
    method config `ours` (`{"name": "lora", "config": ...}`) when it selects exactly these layers."""
    from mmpeft.core.method import method_from_config
    from mmpeft.methods.lora import LoRA

    ranks = {m: a.shape[0] for m, (a, _, _) in modules.items()}
    scales = {m: s for m, (_, _, s) in modules.items()}
    r = max(ranks.values())
    if (ours or {}).get("name") == "lora":
        try:
            method = method_from_config(ours)
        except TypeError:  # written by another mmpeft version: options this one lacks
            method = None
        if method is not None and method.r == r and _selected(root, method.targets, prefix) == set(modules):
            return method
    same = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    scale = next(iter(scales.values())) if same else 1.0
    alpha = None if scale == 1.0 else scale * r
    return LoRA(r=r, alpha=alpha, targets=_targets_for(root, sorted(modules), prefix))


def _copy_plan(root: nn.Module, modules: dict[str, tuple], path: Path, what: str = "UNet") -> list[tuple]:
    """Check the file's deltas against the LoRA pieces on `root` and return what to write (a lower rank
    zero-padded); nothing is written here, so a refusal anywhere leaves the model as it was."""
    pieces = _lora_pieces(root)
    missing = sorted(set(modules) - set(pieces))
    extra = sorted(set(pieces) - set(modules))
    if missing or extra:
        absent = [m for m in missing if _get(root, m) is None]
        detail = (
            f"the {what} has no module {absent[:3]} (a LoRA for another {what}?)"
            if absent
            else f"the file adapts {missing[:3]} which the model's LoRA does not; the model adapts {extra[:3]} "
            "which the file does not"
        )
        raise AdapterMismatch(f"LoRA file {str(path)!r} does not fit the model: {detail}")
    plan = []
    for name, (a, b, scale) in modules.items():
        piece = pieces[name]
        if piece.parts:
            raise NotSupported(f"{name!r} carries a fused-qkv LoRA; a diffusers file adapts whole layers")
        delta = piece.deltas["all"]
        rank = a.shape[0]
        if a.shape[1:] != delta.A.shape[1:] or b.shape[0] != delta.B.shape[0] or b.shape[2:] != delta.B.shape[2:]:
            raise AdapterMismatch(
                f"LoRA file {str(path)!r}: {name!r} has A {list(a.shape)}, B {list(b.shape)}, but the "
                f"model's layer takes A {list(delta.A.shape)}, B {list(delta.B.shape)} (a LoRA for another {what}?)"
            )
        if rank > delta.rank:
            raise AdapterMismatch(
                f"LoRA file {str(path)!r}: {name!r} has rank {rank}, the model's LoRA rank {delta.rank}"
            )
        new_a = torch.zeros_like(delta.A, dtype=torch.float32)
        new_b = torch.zeros_like(delta.B, dtype=torch.float32)
        new_a[:rank] = a.float()
        new_b[:, :rank] = b.float() * (scale / delta.scale)
        plan.append((delta, new_a, new_b))
    return plan


@torch.no_grad()
def _write_plan(plan: list[tuple]) -> None:
    for delta, new_a, new_b in plan:
        delta.A.copy_(new_a.to(delta.A.device, delta.A.dtype))
        delta.B.copy_(new_b.to(delta.B.device, delta.B.dtype))


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _text_modules(encoder: nn.Module, lora_file: DiffusersLoRAFile) -> dict[str, tuple]:
    """The file's text-encoder modules renamed to `encoder`'s layer names (see `_model_name`)."""
    return {_model_name(encoder, name): value for name, value in lora_file.text_modules.items()}


def _check_layers(root: nn.Module, modules: dict[str, tuple], path: Path, what: str) -> None:
    absent = [m for m in modules if _get(root, m) is None]
    if absent:
        raise AdapterMismatch(
            f"LoRA file {str(path)!r} adapts {absent[:3]}, which this {what} does not have (a LoRA for another {what}?)"
        )


def import_diffusers_lora(
    model_or_backbone: nn.Module,
    path: str | os.PathLike,
    weight_name: str | None = None,
    text_encoder: str = "error",
    text_model: nn.Module | None = None,
) -> PeftModel:
    """A diffusers LoRA file (or folder) as an mmpeft LoRA on a Stable Diffusion UNet (and on its text encoder).

    `model_or_backbone`: a `DiffusersUNet` (or a raw `UNet2DConditionModel`, wrapped as one) without a
    method: a `LoRA` is built with the file's rank and targets and a new `PeftModel` returned; or a
    `PeftModel` with a LoRA on exactly the file's layers, loaded in place and returned.

    Built from a file: the rank is the file's (a file mixing ranks gets the largest, lower-rank deltas
    zero-padded: same outputs); mmpeft's own files give back their method configs (alpha, dropout, ...);
    other files get `alpha = scale * r` when every layer has the same scale, else scale 1 with each layer's
    scale folded into its B. Targets are the layer names (`to_q, to_k, to_v, to_out.0`) when they select
    exactly the file's layers, else the full module paths. Outputs equal the diffusers pipeline's with the
    file loaded (`pipe.load_lora_weights`).

    `text_encoder`: "error" (default) refuses a file that also adapts the text encoder, "ignore" leaves that
    part out, "import" reads it into a `LoRA` on the text encoder: the `text_encoder` component of a
    `PeftModel` passed in (which must carry a LoRA on exactly those layers), else `text_model` (the
    pipeline's `CLIPTextModel`, frozen), added to the new model as its `text_encoder` component — the
    model a `LatentDiffusion` run with that `text_method` trains.
    """
    mode = text_encoder
    lora_file = read_diffusers_lora(path, weight_name=weight_name, text_encoder=mode)
    backbone = _unet_backbone(model_or_backbone, "import_diffusers_lora")
    if isinstance(model_or_backbone, PeftModel):
        return _load_in_place(model_or_backbone, lora_file, mode)
    if getattr(backbone, "_mmpeft_method", None) is not None:
        raise NotSupported("the backbone already has a method applied; pass its PeftModel, or a fresh backbone")
    _check_layers(backbone.model, lora_file.modules, lora_file.path, "UNet")
    text = None
    if lora_file.text_modules:
        if text_model is None:
            raise NotSupported(
                f"LoRA file {str(lora_file.path)!r} adapts the text encoder: pass text_model= the pipeline's "
                "CLIPTextModel (CLI: --unet a pipeline folder with text_encoder/), or text_encoder='ignore'"
            )
        text = _text_modules(text_model, lora_file)
        _check_layers(text_model, text, lora_file.path, "text encoder")
    ours = lora_file.mmpeft or {}
    model = PeftModel(backbone, _build_method(backbone, lora_file.modules, ours.get("method")))
    try:
        if text is not None:
            method = _build_method(text_model, text, ours.get("components", {}).get(TEXT_ENCODER), prefix="")
            model.add_component(TEXT_ENCODER, text_model, method)
            _write_plan(_copy_plan(text_model, text, lora_file.path, "text encoder"))
        _write_plan(_copy_plan(backbone.model, lora_file.modules, lora_file.path))
    except BaseException:  # a refused file leaves the backbone and the text encoder as they were
        model.unload()
        if text is not None and TEXT_ENCODER in getattr(model, "component_methods", {}):
            model.component_methods[TEXT_ENCODER].unload(text_model)
        raise
    return model


def _load_in_place(model: PeftModel, lora_file: DiffusersLoRAFile, mode: str) -> PeftModel:
    """The file's deltas into a LoRA model's pieces (its text encoder's too with mode "import"), checked first."""
    from mmpeft.methods.lora import LoRA

    if not isinstance(model.method, LoRA):
        raise NotSupported(
            f"import_diffusers_lora loads into a LoRA model; this model's method is {model.method.name!r} (pass the "
            "bare backbone to build a LoRA model)"
        )
    text_method = getattr(model, "component_methods", {}).get(TEXT_ENCODER)
    plan = []
    if mode == "import" and (lora_file.text_modules or text_method is not None):
        if not isinstance(text_method, LoRA):
            raise AdapterMismatch(
                f"LoRA file {str(lora_file.path)!r} {'adapts' if lora_file.text_modules else 'does not adapt'} the "
                f"text encoder, but the model's text encoder carries {text_method.name if text_method else 'nothing'!r}"
            )
        encoder = model.components[TEXT_ENCODER]
        plan += _copy_plan(encoder, _text_modules(encoder, lora_file), lora_file.path, "text encoder")
    plan += _copy_plan(model.backbone.model, lora_file.modules, lora_file.path)
    _write_plan(plan)  # everything checked before anything is written
    return model
