"""Adapter files: exactly the declared trainable set (plus head) in safetensors, with the method
config, the backbone's signature and the identity of the frozen weights it was trained on in the header,
so a file for another backbone, method, head or other frozen weights is refused with a message saying
which. Files are written atomically, and only with finite values: a failed save never leaves a
half-written file in place of a good one, and a diverged run never leaves a NaN adapter. Loading checks
the header and that every tensor is finite before anything is written into the model.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft.core.errors import AdapterMismatch, MmpeftError
from mmpeft.core.method import method_from_config
from mmpeft.core.model import PeftModel, backbone_signature
from mmpeft.version import __version__

__all__ = [
    "FORMAT",
    "NonFiniteTensors",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "adapter_from_file",
    "check_weights",
    "non_finite",
]

FORMAT = "mmpeft-adapter/1"


class NonFiniteTensors(MmpeftError, ValueError):
    """Tensors hold NaN or inf (a diverged run): they are neither written as an adapter nor loaded from one."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_adapter(model: PeftModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> int:
    """Write the adapter file; returns its size in bytes. Refuses (`NonFiniteTensors`) to write NaN or inf."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.trainable_state_dict().items()}
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteTensors(
            f"not writing adapter file {str(path)!r}: {len(bad)} of {len(tensors)} trained tensors hold NaN or inf "
            f"(e.g. {bad[:3]}); the run diverged — lower the learning rate or check the data"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "mmpeft_version": _version(),
        "method": json.dumps({"name": model.method.name, "config": model.method.config()}),
        "backbone": json.dumps(backbone_signature(model.backbone)),
        "head": json.dumps(model.head_config),
        "weights": json.dumps(model.weights_records()),
        "components": json.dumps(
            {n: {"name": m.name, "config": m.config()} for n, m in getattr(model, "component_methods", {}).items()}
        ),
        "extra": json.dumps(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def read_safetensors(path: Path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(raw string metadata, tensors) of a safetensors file mmpeft wrote (`kind` names it in errors): a missing
    file is a FileNotFoundError, a foreign one an AdapterMismatch."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types on foreign files
        raise AdapterMismatch(f"{str(path)!r} is not a safetensors {kind} ({err})") from err


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of an adapter file; the header's JSON fields are decoded."""
    path = Path(path)
    raw, tensors = read_safetensors(path, "adapter file")
    if raw.get("format") != FORMAT:
        raise AdapterMismatch(
            f"{str(path)!r} is not an mmpeft adapter file (header format {raw.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        header = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "mmpeft_version")}
    except json.JSONDecodeError as err:
        raise AdapterMismatch(f"adapter file {str(path)!r} has a damaged header ({err}); write it again") from err
    missing = [k for k in ("method", "backbone") if not isinstance(header.get(k), dict)]
    if missing or not isinstance(header["method"].get("name"), str):
        raise AdapterMismatch(
            f"adapter file {str(path)!r} has a damaged header: {', '.join(missing) or 'method name'} missing or "
            "malformed; write it again"
        )
    header["format"] = raw["format"]
    header["mmpeft_version"] = raw.get("mmpeft_version")  # absent in files written before it was recorded
    header.setdefault("head", None)
    header.setdefault("components", {})
    header.setdefault("weights", None)  # files written before the frozen weights' identity was recorded
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteTensors(
            f"adapter file {str(path)!r} holds NaN or inf in {len(bad)} of {len(tensors)} tensors (e.g. {bad[:3]}): "
            "it was written by a diverged run; use an earlier checkpoint's adapter"
        )
    return tensors, header


def _version() -> str:
    return __version__


def _filled(method: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """A file's method config with every option the method has now: options added since the file was
    written take their defaults (so old files still load); options the method no longer has are refused."""
    try:
        return {"name": method["name"], "config": json.loads(json.dumps(method_from_config(method).config()))}
    except TypeError as err:
        raise AdapterMismatch(
            f"adapter file {str(path)!r} sets method options this mmpeft's {method['name']!r} does not have "
            f"({err}); it was written by another mmpeft version"
        ) from err


def _describe(sig: dict[str, Any]) -> str:
    return f"{sig['name']!r} ({sig['class']}, {sig['num_features']} features, {sig['num_tensors']} tensors)"


def check_weights(
    recorded: dict[str, Any] | None, model: PeftModel, what: str, allow_other_weights: bool = False
) -> None:
    """Refuse a file (adapter or checkpoint) trained on other frozen weights than the model holds, naming both;
    `allow_other_weights` (a user who means it: an adapter moved to a fine-tuned checkpoint) warns instead.
    Files without a record (written before it existed, or imported from another library) load with a warning."""
    if recorded is None:
        warnings.warn(
            f"{what} does not record which frozen weights it was trained on (written by an older mmpeft or imported); "
            "make sure the backbone holds those weights",
            stacklevel=3,
        )
        return
    ours = model.weights_records()
    for key, theirs in recorded.items():
        mine = ours.get(key)
        if mine is None or theirs.get("fingerprint") is None or mine["fingerprint"] is None:
            continue
        if theirs["fingerprint"] == mine["fingerprint"]:
            continue
        message = (
            f"{what} was trained on other frozen {key} weights: {theirs['source']!r} (fingerprint "
            f"{theirs['fingerprint']}, {theirs['tensors']} tensors) in the file vs {mine['source']!r} (fingerprint "
            f"{mine['fingerprint']}, {mine['tensors']} tensors) in this model"
        )
        if allow_other_weights:
            warnings.warn(message + "; loading it anyway (allow_other_weights)", stacklevel=3)
            continue
        raise AdapterMismatch(
            message + "; its results would be wrong without a word. Build the backbone from the weights it was "
            "trained on (e.g. the same `weights:` file, `pretrained: true`), or, if you mean it (e.g. an adapter "
            "moved to a fine-tuned checkpoint), pass --model.init_args.allow_other_weights true "
            "(load_adapter(..., allow_other_weights=True))"
        )


def load_adapter(
    model: PeftModel, path: str | os.PathLike, components: bool = True, allow_other_weights: bool = False
) -> dict[str, Any]:
    """Load an adapter file into a model built with the same backbone, method, head and frozen weights.

    Everything is checked before anything is written, so a refused file leaves the model as it was.
    `components=False` loads the backbone's part of a file that also adapts other components (the text
    encoder of a latent-diffusion run) into a model without them. `allow_other_weights`: load a file trained
    on other frozen weights (with a warning) instead of refusing it. Returns the file's header.
    """
    tensors, header = read_adapter(path)
    if not components:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("components.")}
        header = {**header, "components": {}}
    file_sig, model_sig = header["backbone"], backbone_signature(model.backbone)
    if file_sig != model_sig:
        raise AdapterMismatch(
            f"adapter file {str(path)!r} was made for backbone {_describe(file_sig)}, but this model's backbone is "
            f"{_describe(model_sig)}; build the model on the backbone the adapter was trained on"
        )
    model_method = {"name": model.method.name, "config": json.loads(json.dumps(model.method.config()))}
    file_method = _filled(header["method"], path) if header["method"]["name"] == model.method.name else header["method"]
    if file_method != model_method:
        theirs, ours = file_method["config"], model_method["config"]
        differ = [k for k in dict.fromkeys([*theirs, *ours]) if theirs.get(k) != ours.get(k)]
        detail = ", ".join(f"{k}={theirs.get(k)!r} in the file vs {ours.get(k)!r}" for k in differ)
        if file_method["name"] != model_method["name"]:
            detail = f"method {file_method['name']!r} in the file vs {model_method['name']!r}"
        raise AdapterMismatch(
            f"adapter file {str(path)!r} holds method {file_method['name']!r} {theirs}, but the model has "
            f"{model_method['name']!r} {ours} ({detail}); build the model from the file's method config"
        )
    ours = {n: json.loads(json.dumps({"name": m.name, "config": m.config()}))
            for n, m in getattr(model, "component_methods", {}).items()}  # fmt: skip
    theirs = {n: _filled(m, path) for n, m in header["components"].items()}
    if theirs != ours:
        raise AdapterMismatch(
            f"adapter file {str(path)!r} holds component methods {theirs}, but the model has {ours}; build the "
            "model with the file's components (e.g. the same text_method)"
        )
    structure = lambda h: {k: v for k, v in h.items() if k != "init"} if h else h
    if header["head"] is not None and structure(header["head"]) != structure(model.head_config):
        classes = (header["head"].get("num_classes"), (model.head_config or {}).get("num_classes"))
        hint = f" (a head for another number of classes: {classes[0]} vs {classes[1]})" if len(set(classes)) > 1 else ""
        raise AdapterMismatch(
            f"adapter file {str(path)!r} holds head {header['head']}, but the model's head is {model.head_config}"
            f"{hint}; build the model with the file's head (adapter_from_file does)"
        )
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    wrong = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {keys[:4]}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        hint = " (a head for another number of classes?)" if any(k.startswith("head.") for k in wrong) else ""
        raise AdapterMismatch(f"adapter file {str(path)!r} does not fit this model{hint}: {detail}")
    weights = header["weights"]
    if weights is not None and not components:
        weights = {k: v for k, v in weights.items() if not k.startswith("components.")}
    check_weights(weights, model, f"adapter file {str(path)!r}", allow_other_weights)
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for k, v in tensors.items():
            state[k].copy_(v.to(state[k].dtype))
    return header


def adapter_from_file(
    backbone: torch.nn.Module, path: str | os.PathLike, allow_other_weights: bool = False
) -> PeftModel:
    """Rebuild the trained model (method, head and their tensors) from a fresh backbone and an adapter file alone."""
    tensors, header = read_adapter(path)
    method = method_from_config(header["method"])
    head = header.get("head")
    if head is None and "head.weight" in tensors:  # files written before heads were recorded: a Linear head
        head = {"name": "linear", "num_classes": int(tensors["head.weight"].shape[0])}
    model = PeftModel(backbone, method, num_classes=head["num_classes"] if head else None, head=head)
    load_adapter(model, path, allow_other_weights=allow_other_weights)
    return model
