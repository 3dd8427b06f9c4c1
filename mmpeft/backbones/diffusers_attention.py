"""Attention kernels of diffusers models (UNets, DiTs) through diffusers' own attention-backend API.

diffusers (>= 0.35) routes attention through `dispatch_attention_fn` and picks its kernel with
`ModelMixin.set_attention_backend` ("native" = torch SDPA, "xformers", flash, ...). That call only reaches
processors that carry an `_attention_backend` slot, and the UNet's and the DiT's stock `AttnProcessor2_0` has
none (diffusers 0.42: the call succeeds and changes nothing). So `use_fast_attention` first gives every stock
`Attention` a `DispatchAttnProcessor` (what `AttnProcessor2_0` computes, with the kernel call made through the
dispatcher), then asks diffusers for the backend: xformers only on CUDA, after the same one-off kernel probe
mmpeft's token attention uses (`mmpeft.core.attention`: xformers wheels often import fine while their kernels
fail to load), else native SDPA.

Swapping processors loses any state a processor holds; mmpeft's methods keep theirs in Linear modules (LoRA's
`lora` child on `to_q`, ...), so a swap keeps them active. Processors that are not stock diffusers ones (custom
diffusion, IP-Adapter) are left alone, and the added-KV ones go to their SDPA version as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["use_fast_attention", "attention_backend", "DispatchAttnProcessor", "FAST_BACKENDS"]

FAST_BACKENDS = ("auto", "xformers", "sdpa")
_DIFFUSERS_NAME = {"sdpa": "native", "xformers": "xformers"}  # ours -> diffusers' AttentionBackendName
log = logging.getLogger(__name__)


class DispatchAttnProcessor:
    """diffusers' `AttnProcessor2_0` computation with the attention kernel chosen by diffusers' dispatcher.

    `_attention_backend` is the slot `ModelMixin.set_attention_backend` fills; None means the dispatcher's
    active backend (native SDPA unless changed). The Attention's own `scale` is passed, so a `scale_qk=False`
    layer is served too."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # [B, C, H, W] -> tokens [B, HW, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len = context.shape[:2]
        if attention_mask is not None:  # [B * heads, 1 or Lq, Lk] -> [B, heads, 1 or Lq, Lk]
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # the dispatcher takes [B, L, heads, head_dim]; diffusers' q / k norms act on the last (head_dim) axis
        query, key, value = (t.unflatten(-1, (attn.heads, head_dim)) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, scale=attn.scale, backend=self._attention_backend
        )
        out = out.flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # the output projection, then its dropout
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _is_diffusers_model(module: nn.Module) -> bool:
    """A diffusers `ModelMixin` (UNet, DiT, VAE): what `set_attention_backend` is defined on."""
    return hasattr(module, "set_attention_backend") or hasattr(module, "set_attn_processor")


def _models(obj: Any) -> list[nn.Module]:
    """The diffusers models behind a PeftModel, an mmpeft diffusers backbone, a model or a pipeline."""
    from mmpeft.core.model import PeftModel

    if isinstance(obj, PeftModel):
        obj = obj.backbone
    inner = getattr(obj, "model", None)
    if isinstance(obj, nn.Module) and isinstance(inner, nn.Module) and _is_diffusers_model(inner):
        return [inner]  # a DiffusersDenoiser
    if isinstance(obj, nn.Module):
        return [obj]
    components = getattr(obj, "components", None)  # a DiffusionPipeline
    if isinstance(components, dict):
        found = [m for m in components.values() if isinstance(m, nn.Module) and _is_diffusers_model(m)]
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
            if isinstance(attn.processor, DispatchAttnProcessor):
                backend = getattr(attn.processor._attention_backend, "value", attn.processor._attention_backend)
                kinds.add("xformers" if backend == "xformers" else "sdpa" if backend in (None, "native") else backend)
                continue
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


def _install_dispatch(model: nn.Module) -> None:
    """Stock processors (SDPA, plain, xformers) -> `DispatchAttnProcessor`; added-KV ones -> their SDPA version;
    custom processors stay."""
    from diffusers.models import attention_processor as ap

    stock = (ap.AttnProcessor, ap.AttnProcessor2_0, ap.XFormersAttnProcessor, DispatchAttnProcessor)
    added_kv = (ap.AttnAddedKVProcessor, ap.XFormersAttnAddedKVProcessor)
    for attn in _attention_modules(model):
        processor = attn.processor
        if type(processor) in stock:
            attn.set_processor(DispatchAttnProcessor())
        elif type(processor) in added_kv:
            attn.set_processor(ap.AttnAddedKVProcessor2_0())


def _set_backend(model: nn.Module, backend: str) -> None:
    """diffusers' `set_attention_backend`, without its per-call "experimental feature" warning."""
    if not hasattr(model, "set_attention_backend"):  # a plain nn.Module holding diffusers Attention layers
        for attn in _attention_modules(model):
            if isinstance(attn.processor, DispatchAttnProcessor):
                attn.processor._attention_backend = _DIFFUSERS_NAME[backend]
        return
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model.set_attention_backend(_DIFFUSERS_NAME[backend])
    finally:
        quiet.setLevel(level)


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
    for model in models:
        _install_dispatch(model)
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
                    _set_backend(model, "xformers")
                chosen = "xformers"
            except Exception as err:  # diffusers' own requirement check failing means "use SDPA"
                log.info("diffusers could not use xformers (%s); using torch SDPA", err)
        if chosen != "xformers" and backend == "xformers":
            raise RuntimeError(
                "attention backend 'xformers' was requested but is unusable here (it needs the model on CUDA, "
                "xformers installed (pip install 'mmpeft[xformers]') and kernels that load); use backend='auto'"
            )
    if chosen == "sdpa":
        for model in models:
            _set_backend(model, "sdpa")
    log.info("diffusers attention backend: %s", chosen)
    return chosen
