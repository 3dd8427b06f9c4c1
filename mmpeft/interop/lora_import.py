"""Reading diffusers LoRA files (diffusers', kohya's and mmpeft's own) into mmpeft LoRA adapters; the format and
how scales are read: `mmpeft.interop.diffusers_lora`."""

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
from mmpeft.interop.lora_format import (
    DIFFUSERS_METADATA_KEY,
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    PREFIXES,
    TEXT_ENCODER,
    TEXT_MODES,
    lora_pieces,
    model_layer_name,
    unet_backbone,
)

__all__ = ["DiffusersLoRAFile", "import_diffusers_lora", "read_diffusers_lora"]


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

    if text_encoder not in TEXT_MODES:
        raise ValueError(f"text_encoder must be one of {TEXT_MODES}, got {text_encoder!r}")
    file = _resolve_file(path, weight_name)
    raw_header = _file_header(file)
    _refuse_mmpeft_adapter(file, raw_header)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(file), local_files_only=True)[:2]
    meta = json.loads(raw_header[DIFFUSERS_METADATA_KEY]) if raw_header.get(DIFFUSERS_METADATA_KEY) else {}
    ours = json.loads(raw_header[METADATA_KEY]) if raw_header.get(METADATA_KEY) else None

    prefixed = any(k.split(".", 1)[0] in PREFIXES for k in state)
    others = sorted({k.split(".", 1)[0] for k in state if k.split(".", 1)[0] in PREFIXES} - {"unet"})
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
    pieces = lora_pieces(root)
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
    """The file's text-encoder modules renamed to `encoder`'s layer names (see `model_layer_name`)."""
    return {model_layer_name(encoder, name): value for name, value in lora_file.text_modules.items()}


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
    backbone = unet_backbone(model_or_backbone, "import_diffusers_lora")
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
