"""mmpeft LoRA <-> diffusers LoRA files (`pytorch_lora_weights.safetensors`) for Stable Diffusion UNets.

Export writes what `StableDiffusionPipeline.load_lora_weights(dir)` loads and what diffusers' DreamBooth
LoRA script (`save_lora_weights`) writes; import reads those files, and also the older diffusers layouts
and kohya-ss files that diffusers itself converts, into an mmpeft `LoRA` on a `DiffusersUNet`.

The file format (peft keys, diffusers >= 0.2x; checked against diffusers 0.42):
  `unet.<module path>.lora_A.weight`  A, [r, in] (a Conv2d: [r, in, kh, kw], peft's k×k "down" conv)
  `unet.<module path>.lora_B.weight`  B, [out, r] (a Conv2d: [out, r, 1, 1])
where `<module path>` is the layer's name in the `UNet2DConditionModel` (`down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q`). With `key_style="diffusers"` the two become `.lora.down.weight` /
`.lora.up.weight`, exactly what the DreamBooth script writes (`convert_state_dict_to_diffusers`);
diffusers converts them back to the peft names on load.

Scaling: a file without alphas means `W + B A` to diffusers (peft's `lora_alpha / r` with `lora_alpha = r`
when absent). mmpeft's `W + (alpha / r) B A` is therefore written with the scale folded into B
(`lora_B = (alpha / r) B`), which every loader reads the same way (no reliance on `network_alphas` or on
the LoRA-config metadata newer diffusers honour). The mmpeft method config goes into the safetensors
header under `mmpeft_lora`, so an import of mmpeft's own file gives back the same `alpha` and options.

On import, a module's scale is what diffusers would use: the LoRA-config metadata diffusers'
`save_lora_weights(..., unet_lora_adapter_metadata=...)` writes (`lora_alpha`, `alpha_pattern`,
`rank_pattern`, `use_rslora`), else kohya `network_alphas` (`alpha / r`), else 1.
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
_KEY_STYLES = {"peft": (".lora_A.weight", ".lora_B.weight"), "diffusers": (".lora.down.weight", ".lora.up.weight")}
_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


# -- export --------------------------------------------------------------------------------------------


def _unet_backbone(obj: Any, what: str):
    """The `DiffusersUNet` of a PeftModel / backbone / raw `UNet2DConditionModel`."""
    from mmpeft.backbones.diffusion import DiffusersUNet  # noqa: PLC0415
    from mmpeft.core.backbone import as_backbone  # noqa: PLC0415

    backbone = obj.backbone if isinstance(obj, PeftModel) else as_backbone(obj)
    if not isinstance(backbone, DiffusersUNet):
        raise NotSupported(
            f"{what} works on Stable Diffusion UNets (a DiffusersUNet backbone, e.g. tiny_sd_unet or "
            f"diffusers_unet:<folder>), not on {type(backbone).__name__} {getattr(backbone, 'name', '')!r}"
        )
    return backbone


def _lora_pieces(unet: nn.Module) -> dict[str, Any]:
    """{host module path in the UNet: LoRADelta} for every mmpeft LoRA piece on the UNet."""
    from mmpeft.methods.lora import LoRADelta  # noqa: PLC0415

    pieces = {}
    for name, piece in adapter_modules(unet):
        if isinstance(piece, LoRADelta):
            host, _, attr = name.rpartition(".")
            if attr != "lora":
                raise NotSupported(f"unexpected LoRA piece {name!r}: mmpeft attaches LoRA as a host's child 'lora'")
            pieces[host] = piece
    return pieces


def diffusers_lora_state_dict(
    model: PeftModel, key_style: str = "peft", prefix: str = "unet", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors `export_diffusers_lora` writes: `{prefix}.{module}.lora_A.weight` = A and `.lora_B.weight`
    = (alpha / r) B, per adapted Linear / Conv2d of the UNet (see the module docstring)."""
    from mmpeft.methods.lora import LoRA  # noqa: PLC0415

    if key_style not in _KEY_STYLES:
        raise ValueError(f"key_style must be one of {sorted(_KEY_STYLES)}, got {key_style!r}")
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
    unet = backbone.model
    pieces = _lora_pieces(unet)
    if not pieces:
        raise NotSupported("the model's UNet carries no LoRA pieces (was the method unloaded?)")
    a_suffix, b_suffix = _KEY_STYLES[key_style]
    out: dict[str, torch.Tensor] = {}
    for host_name, piece in pieces.items():
        host = unet.get_submodule(host_name)
        if piece.parts:
            raise NotSupported(f"LoRA on parts {piece.parts} of a fused qkv ({host_name!r}) has no diffusers form")
        if isinstance(host, nn.Conv2d) and host.dilation != (1, 1):
            raise NotSupported(f"{host_name!r} is a dilated Conv2d; peft's LoRA conv has no dilation")
        delta = piece.deltas["all"]
        a = delta.A.detach().float()
        b = delta.B.detach().float() * delta.scale
        target = dtype or delta.A.dtype
        out[f"{prefix}.{host_name}{a_suffix}"] = a.to("cpu", target).contiguous()
        out[f"{prefix}.{host_name}{b_suffix}"] = b.to("cpu", target).contiguous()
    return out


def export_diffusers_lora(
    model: PeftModel,
    path: str | os.PathLike,
    weight_name: str = LORA_WEIGHT_NAME,
    key_style: str = "peft",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model's LoRA (on a `DiffusersUNet`) as a diffusers LoRA file; returns the file's path.

    `path` is a folder (the file is `path/weight_name`, what `pipe.load_lora_weights(path)` finds) or a
    `.safetensors` file. `key_style`: "peft" (`lora_A` / `lora_B`) or "diffusers" (`lora.down` / `lora.up`,
    as diffusers' DreamBooth script). `dtype`: of the written tensors (default: the LoRA's own). The scale
    alpha / r is folded into B; the method config goes into the header (see the module docstring).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    from mmpeft.core.model import backbone_signature  # noqa: PLC0415

    tensors = diffusers_lora_state_dict(model, key_style=key_style, dtype=dtype)
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / weight_name
    file.parent.mkdir(parents=True, exist_ok=True)
    method = model.method
    header = {
        "format": _FORMAT,
        "method": {"name": method.name, "config": json.loads(json.dumps(method.config()))},
        "scale_in_B": True,
        "backbone": backbone_signature(model.backbone),
    }
    tmp = file.with_name(file.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return file


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class DiffusersLoRAFile:
    """A diffusers LoRA file's UNet part, in peft terms.

    `modules`: {UNet module path: (A, B, scale)} with the module's delta `scale * B @ A` (B as stored);
    `skipped`: the prefixes of the file's other parts (text encoders) left out; `mmpeft`: the header
    mmpeft wrote (None for files from elsewhere)."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    skipped: list[str] = field(default_factory=list)
    mmpeft: dict[str, Any] | None = None

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
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _pattern_key(patterns: Any, name: str) -> str | None:
    """peft's `get_pattern_key`: the first pattern that is a dotted suffix (a regex) of `name`."""
    for key in patterns or ():
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _alpha_module(key: str) -> str:
    """The module an alpha belongs to: diffusers' kohya conversion names them after the converted down
    weight (`...attn1.processor.to_q_lora.down.weight.alpha`), older files after the module (`...to_q.alpha`)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft  # noqa: PLC0415

    base = key.removesuffix(".alpha")
    converted = next(iter(convert_unet_state_dict_to_peft({base: None})))
    return converted.split(".lora_")[0] if ".lora_" in converted else converted


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
    from mmpeft.core.state import FORMAT  # noqa: PLC0415

    found = header.get("format", "")
    if found.split("/")[0] == FORMAT.split("/")[0]:
        raise AdapterMismatch(
            f"{str(file)!r} is already an mmpeft adapter file (header format {found!r}), not a diffusers LoRA file: "
            f"nothing to import. Use it as it is (--adapter {file}), or write a diffusers file from it with "
            f"`mmpeft export-lora {file} --out <folder> --unet <pipeline>`"
        )


def read_diffusers_lora(
    path: str | os.PathLike, weight_name: str | None = None, text_encoder: str = "error"
) -> DiffusersLoRAFile:
    """Read the UNet part of a diffusers LoRA file (or a folder holding `pytorch_lora_weights.safetensors`).

    Reads what `StableDiffusionPipeline.lora_state_dict` reads (peft keys, `lora.down` / `lora.up`, the
    old attention-processor names, kohya-ss files with alphas). `text_encoder`: "error" refuses a file
    that also adapts a text encoder (an mmpeft UNet model would silently drop it); "ignore" skips that part.
    """
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft  # noqa: PLC0415

    if text_encoder not in ("error", "ignore"):
        raise ValueError(f"text_encoder must be 'error' or 'ignore', got {text_encoder!r}")
    file = _resolve_file(path, weight_name)
    raw_header = _file_header(file)
    _refuse_mmpeft_adapter(file, raw_header)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(file), local_files_only=True)[:2]
    config_meta = json.loads(raw_header[_DIFFUSERS_METADATA_KEY]) if raw_header.get(_DIFFUSERS_METADATA_KEY) else {}
    ours = json.loads(raw_header[METADATA_KEY]) if raw_header.get(METADATA_KEY) else None

    prefixed = any(k.split(".", 1)[0] in _PREFIXES for k in state)
    skipped = sorted({k.split(".", 1)[0] for k in state if k.split(".", 1)[0] in _PREFIXES} - {"unet"})
    if skipped and text_encoder == "error":
        raise NotSupported(
            f"LoRA file {str(file)!r} also adapts {', '.join(skipped)}; mmpeft imports the UNet part only: pass "
            "text_encoder='ignore' to leave that part out"
        )
    if prefixed:
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    else:  # unet.save_attn_procs files: UNet keys without a prefix
        state = dict(state)
    if not state:
        raise AdapterMismatch(f"LoRA file {str(file)!r} has no UNet LoRA tensors")
    file_alphas = {
        _alpha_module(k.removeprefix("unet.")): float(v) for k, v in (alphas or {}).items() if k.startswith("unet.")
    }
    for key in [k for k in state if k.endswith(".alpha")]:  # alphas stored beside peft keys (kohya style)
        file_alphas[_alpha_module(key)] = float(state.pop(key))
    config = {k.removeprefix("unet."): v for k, v in config_meta.items() if k.startswith("unet.")} or None

    if any(".lora_A." not in k and ".lora_B." not in k for k in state):
        state = convert_unet_state_dict_to_peft(state)
    refused = [k for k in state if "lora_magnitude_vector" in k or (".lora_B." in k and k.endswith(".bias"))]
    if refused or (config and (config.get("use_dora") or config.get("lora_bias"))):
        raise NotSupported(f"LoRA file {str(file)!r} holds DoRA or LoRA-bias tensors ({refused[:2]}); mmpeft's "
                           "LoRA has neither")  # fmt: skip
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    names = sorted({k.split(".lora_")[0] for k in state})
    for name in names:
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        own = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
        others = [k for k in state if k.startswith(name + ".lora_") and k not in own]
        if a is None or b is None or others:
            keys = sorted(k for k in state if k.startswith(name + ".lora_"))
            raise AdapterMismatch(f"LoRA file {str(file)!r}: {name!r} does not have exactly lora_A / lora_B ({keys})")
        if a.shape[0] != b.shape[1]:
            raise AdapterMismatch(f"LoRA file {str(file)!r}: {name!r} has A {list(a.shape)} and B {list(b.shape)}")
        modules[name] = (a, b, _scale_of(name, a.shape[0], config, file_alphas))
    return DiffusersLoRAFile(path=file, modules=modules, skipped=skipped, mmpeft=ours)


# -- import --------------------------------------------------------------------------------------------


def _targets_for(backbone: nn.Module, modules: list[str]) -> tuple[str, ...]:
    """The shortest LoRA targets that select exactly `modules` on this backbone: the layer names
    (`to_q`, `to_out.0`, `conv2`) when those pick out the same set, else the full module paths."""
    from mmpeft.core.inject import match_name  # noqa: PLC0415
    from mmpeft.methods.lora import DENOISER_TARGETS  # noqa: PLC0415

    wanted = {f"model.{m}" for m in modules}
    short = []
    for m in modules:
        parts = m.split(".")
        cut = 2 if parts[-1].isdigit() and len(parts) > 1 else 1
        short.append(".".join(parts[-cut:]))
    order = {t: i for i, t in enumerate(DENOISER_TARGETS)}
    short = sorted(dict.fromkeys(short), key=lambda s: (order.get(s, len(order)), s))
    named = [n for n, _ in backbone.named_modules() if n]
    selected = {n for n in named if any(match_name(n, s) for s in short)}
    if selected == wanted and not any(c in s for s in short for c in "*?["):
        return tuple(short)
    return tuple(sorted(modules))


def _selected(backbone: nn.Module, targets: tuple[str, ...] | None) -> set[str] | None:
    """Module paths (in the UNet) that LoRA `targets` select (None: the UNet default), or None if refused."""
    from mmpeft.core.inject import find_modules  # noqa: PLC0415
    from mmpeft.methods.lora import DEFAULT_TARGETS, parse_target  # noqa: PLC0415

    patterns = [parse_target(t)[0] for t in (targets if targets is not None else DEFAULT_TARGETS["unet"])]
    try:
        found = find_modules(backbone, patterns, required=targets is not None)
    except (NotSupported, ValueError):
        return None
    return {n.removeprefix("model.") for n, _ in found}


def _build_method(backbone: nn.Module, lora_file: DiffusersLoRAFile):
    """An mmpeft `LoRA` for the file: its rank (the largest one), and, for mmpeft's own files, its config."""
    from mmpeft.core.method import method_from_config  # noqa: PLC0415
    from mmpeft.methods.lora import LoRA  # noqa: PLC0415

    ranks, scales = lora_file.ranks, {m: s for m, (_, _, s) in lora_file.modules.items()}
    r = max(ranks.values())
    ours = lora_file.mmpeft or {}
    if ours.get("method", {}).get("name") == "lora":
        try:
            method = method_from_config(ours["method"])
        except TypeError:  # written by another mmpeft version: options this one lacks
            method = None
        if method is not None and method.r == r and _selected(backbone, method.targets) == set(lora_file.modules):
            return method
    same = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    scale = next(iter(scales.values())) if same else 1.0
    alpha = None if scale == 1.0 else scale * r
    return LoRA(r=r, alpha=alpha, targets=_targets_for(backbone, sorted(lora_file.modules)))


def _copy_into(model: PeftModel, lora_file: DiffusersLoRAFile) -> None:
    """Write the file's deltas into the model's LoRA pieces (zero-padding a lower rank), checking all first."""
    unet = model.backbone.model
    pieces = _lora_pieces(unet)
    missing = sorted(set(lora_file.modules) - set(pieces))
    extra = sorted(set(pieces) - set(lora_file.modules))
    if missing or extra:
        absent = [m for m in missing if _get(unet, m) is None]
        detail = (
            f"the UNet has no module {absent[:3]} (a LoRA for another UNet?)"
            if absent
            else f"the file adapts {missing[:3]} which the model's LoRA does not; the model adapts {extra[:3]} "
            "which the file does not"
        )
        raise AdapterMismatch(f"LoRA file {str(lora_file.path)!r} does not fit the model: {detail}")
    plan = []
    for name, (a, b, scale) in lora_file.modules.items():
        piece = pieces[name]
        if piece.parts:
            raise NotSupported(f"{name!r} carries a fused-qkv LoRA; a diffusers file adapts whole layers")
        delta = piece.deltas["all"]
        rank = a.shape[0]
        if a.shape[1:] != delta.A.shape[1:] or b.shape[0] != delta.B.shape[0] or b.shape[2:] != delta.B.shape[2:]:
            raise AdapterMismatch(
                f"LoRA file {str(lora_file.path)!r}: {name!r} has A {list(a.shape)}, B {list(b.shape)}, but the "
                f"model's layer takes A {list(delta.A.shape)}, B {list(delta.B.shape)} (a LoRA for another UNet?)"
            )
        if rank > delta.rank:
            raise AdapterMismatch(
                f"LoRA file {str(lora_file.path)!r}: {name!r} has rank {rank}, the model's LoRA rank {delta.rank}"
            )
        new_a = torch.zeros_like(delta.A, dtype=torch.float32)
        new_b = torch.zeros_like(delta.B, dtype=torch.float32)
        new_a[:rank] = a.float()
        new_b[:, :rank] = b.float() * (scale / delta.scale)
        plan.append((delta, new_a, new_b))
    with torch.no_grad():
        for delta, new_a, new_b in plan:
            delta.A.copy_(new_a.to(delta.A.device, delta.A.dtype))
            delta.B.copy_(new_b.to(delta.B.device, delta.B.dtype))


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def import_diffusers_lora(
    model_or_backbone: nn.Module,
    path: str | os.PathLike,
    weight_name: str | None = None,
    text_encoder: str = "error",
) -> PeftModel:
    """A diffusers LoRA file (or folder) as an mmpeft LoRA on a Stable Diffusion UNet.

    `model_or_backbone`: a `DiffusersUNet` (or a raw `UNet2DConditionModel`, wrapped as one) without a
    method: a `LoRA` is built with the file's rank and targets and a new `PeftModel` returned; or a
    `PeftModel` with a LoRA on exactly the file's layers, loaded in place and returned.

    Built from a file: the rank is the file's (a file mixing ranks gets the largest, lower-rank deltas
    zero-padded: same outputs); mmpeft's own files give back their method config (alpha, dropout, ...);
    other files get `alpha = scale * r` when every layer has the same scale, else scale 1 with each layer's
    scale folded into its B. Targets are the layer names (`to_q, to_k, to_v, to_out.0`) when they select
    exactly the file's layers, else the full module paths. Outputs equal the diffusers pipeline's with the
    file loaded (`pipe.load_lora_weights`). `text_encoder`: see `read_diffusers_lora`.
    """
    lora_file = read_diffusers_lora(path, weight_name=weight_name, text_encoder=text_encoder)
    backbone = _unet_backbone(model_or_backbone, "import_diffusers_lora")
    if isinstance(model_or_backbone, PeftModel):
        from mmpeft.methods.lora import LoRA  # noqa: PLC0415

        if not isinstance(model_or_backbone.method, LoRA):
            raise NotSupported(
                f"import_diffusers_lora loads into a LoRA model; this model's method is "
                f"{model_or_backbone.method.name!r} (pass the bare backbone to build a LoRA model)"
            )
        model = model_or_backbone
    else:
        if getattr(backbone, "_mmpeft_method", None) is not None:
            raise NotSupported("the backbone already has a method applied; pass its PeftModel, or a fresh backbone")
        absent = [m for m in lora_file.modules if _get(backbone.model, m) is None]
        if absent:
            raise AdapterMismatch(
                f"LoRA file {str(lora_file.path)!r} adapts {absent[:3]}, which this UNet does not have "
                f"(a LoRA for another UNet?)"
            )
        model = PeftModel(backbone, _build_method(backbone, lora_file))
        try:
            _copy_into(model, lora_file)
        except BaseException:  # a refused file leaves the backbone as it was
            model.unload()
            raise
        return model
    _copy_into(model, lora_file)  # checks everything before writing anything
    return model
