"""A trained diffusion model with its method folded in, written as plain diffusers folders: the denoiser
(`unet/` or `transformer/`) and, when the run adapted it, the text encoder (`text_encoder/`), each reloadable with
diffusers' / transformers' own `from_pretrained` and no mmpeft. For any mergeable method (DiffFit, LoRA, SVFit,
BitFit, ...): `merge_and_unload()` then `save_pretrained`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from mmpeft.core.errors import NotMergeable, NotSupported, OutputExists
from mmpeft.core.model import PeftModel

__all__ = ["export_merged"]


def export_merged(model: PeftModel, out: str | os.PathLike) -> dict[str, Path]:
    """Merge the model's method (and its components' methods) into the weights, for good, and write
    `out/<unet|transformer>/` (+ `out/text_encoder/`); returns {part: folder}. `out` must not hold files yet; the
    folders appear whole or not at all."""
    backbone = model.backbone
    inner = getattr(backbone, "model", None)
    if inner is None or not hasattr(inner, "save_pretrained"):
        raise NotSupported(f"export_merged writes diffusers models; the backbone is a {type(backbone).__name__}")
    methods = {"backbone": model.method, **getattr(model, "component_methods", {})}
    unmergeable = [f"{part} ({m.name})" for part, m in methods.items() if not m.mergeable]
    if unmergeable:
        raise NotMergeable(f"cannot fold {', '.join(unmergeable)} into the weights: not a mergeable method")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputExists(f"{out} is not empty; give a new folder")
    part = "unet" if getattr(backbone, "family", "") == "unet" else "transformer"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.merge_and_unload()
        inner.save_pretrained(tmp / part)
        written = {part: out / part}
        for name, method in getattr(model, "component_methods", {}).items():
            component: nn.Module = model.components[name]
            method.merge_and_unload(component)
            component.save_pretrained(tmp / name)
            written[name] = out / name
        out.mkdir(parents=True, exist_ok=True)
        for child in tmp.iterdir():
            os.replace(child, out / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
