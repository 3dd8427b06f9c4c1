"""Attention kernels of diffusers models: xformers on CUDA when its kernels run, else torch SDPA.

diffusers runs attention through per-`Attention` *processors*. `enable_xformers_memory_efficient_attention()`
replaces them with xformers ones; it raises without CUDA or xformers, and xformers wheels often import fine
while their kernels fail to load (a wheel built for another torch / CUDA). So `use_fast_attention` tries
xformers only on CUDA, after the same one-off kernel probe mmpeft's own attention uses
(`mmpeft.core.attention`), and otherwise keeps or restores SDPA (`AttnProcessor2_0`).

Swapping processors loses any state a processor holds (diffusers' `set_attn_processor` replaces the objects).
mmpeft's methods keep theirs in Linear
modules (LoRA's `lora` child on `to_q`, ...), so a swap keeps them active; processors that are not stock
diffusers ones (custom diffusion, IP-Adapter) are left alone on the SDPA path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["use_fast_attention", "attention_backend", "FAST_BACKENDS"]

FAST_BACKENDS = ("auto", "xformers", "sdpa")
log = logging.getLogger(__name__)


def _models(obj: Any) -> list[nn.Module]:
    """The diffusers models behind a PeftModel, an mmpeft diffusers backbone, a model or a pipeline."""
    from mmpeft.core.model import PeftModel

    if isinstance(obj, PeftModel):
        obj = obj.backbone
    inner = getattr(obj, "model", None)
    if isinstance(obj, nn.Module) and isinstance(inner, nn.Module) and hasattr(inner, "set_attn_processor"):
        return [inner]  # a DiffusersDenoiser
    if isinstance(obj, nn.Module):
        return [obj]
    components = getattr(obj, "components", None)  # a DiffusionPipeline
    if isinstance(components, dict):
        found = [m for m in components.values() if isinstance(m, nn.Module) and hasattr(m, "set_attn_processor")]
        if found:
            return found
    raise TypeError(
        f"use_fast_attention takes a diffusers model, an mmpeft diffusers backbone or PeftModel, or a pipeline; "
        f"got {type(obj).__name__}"
    )


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def attention_backend(obj: Any) -> str:
    """What the models' attention runs on: "xformers", "sdpa" (AttnProcessor2_0 and its kin), "math" (plain
    `AttnProcessor`), "mixed", or "none" (no diffusers attention)."""
    kinds = set()
    for model in _models(obj):
        for attn in _attention_modules(model):
            name = type(attn.processor).__name__
            kinds.add("xformers" if "XFormers" in name else "sdpa" if name.endswith("2_0") else "math"
                      if name in ("AttnProcessor", "AttnAddedKVProcessor") else name)  # fmt: skip
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _xformers_usable(model: nn.Module, device: torch.device) -> bool:
    from mmpeft.core.attention import _kernels_load, _xformers_ops  # the shared probe

    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    xops = _xformers_ops()
    if xops is None:
        return False
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return _kernels_load(xops, device, dtype)


def _set_sdpa(model: nn.Module) -> None:
    """Stock processors (xformers or plain) back to their SDPA versions; custom processors stay."""
    from diffusers.models import attention_processor as ap

    plain = (ap.AttnProcessor, ap.XFormersAttnProcessor)
    added_kv = (ap.AttnAddedKVProcessor, ap.XFormersAttnAddedKVProcessor)
    for attn in _attention_modules(model):
        processor = attn.processor
        if type(processor) in plain and attn.scale_qk:  # SDPA applies the default 1/sqrt(d) scale only
            attn.set_processor(ap.AttnProcessor2_0())
        elif type(processor) in added_kv:
            attn.set_processor(ap.AttnAddedKVProcessor2_0())


def use_fast_attention(unet_or_backbone: Any, backend: str = "auto", device: str | torch.device | None = None) -> str:
    """Put a diffusers model's attention on the fastest working kernel; returns "xformers" or "sdpa".

    `unet_or_backbone`: a `UNet2DConditionModel` / any diffusers model, an mmpeft `DiffusersUNet` /
    `DiffusersDiT` or a `PeftModel` on one, or a pipeline (all its models). `backend`: "auto" (xformers when
    usable, else SDPA), "sdpa", or "xformers" (raises if unusable). `device`: where the model will run
    (default: where its parameters are); xformers needs CUDA there, a CUDA build of torch, xformers
    installed, and its kernels passing a one-off probe. Call it after moving the model, or pass
    `device="cuda"` when the model moves later (a Lightning module in `setup`).
    """
    if backend not in FAST_BACKENDS:
        raise ValueError(f"attention backend must be one of {FAST_BACKENDS}, got {backend!r}")
    models = _models(unet_or_backbone)
    chosen = "sdpa"
    if backend != "sdpa":
        ok = True
        for model in models:
            param = next(model.parameters(), None)
            where = torch.device(device) if device is not None else (param.device if param is not None else None)
            ok = ok and where is not None and _xformers_usable(model, where)
        if ok:
            try:
                for model in models:
                    model.enable_xformers_memory_efficient_attention()
                chosen = "xformers"
            except Exception as err:  # diffusers' own probe failing means "use SDPA"
                log.info("diffusers could not enable xformers (%s); using torch SDPA", err)
        if chosen != "xformers" and backend == "xformers":
            raise RuntimeError(
                "attention backend 'xformers' was requested but is unusable here (it needs the model on CUDA, "
                "xformers installed (pip install 'mmpeft[xformers]') and kernels that load); use backend='auto'"
            )
    if chosen == "sdpa":
        for model in models:
            _set_sdpa(model)
    log.info("diffusers attention backend: %s", chosen)
    return chosen
