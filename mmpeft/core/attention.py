"""The one attention entry point: xformers on CUDA when its kernels load, else torch SDPA.

xformers is an optional GPU extra. Its PyPI wheels are built for one torch/CUDA pair and often
import fine while their kernels fail to load, so "importable" is not enough: the first call on a
device runs a tiny probe, and any failure there falls back to SDPA for good (logged once).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["attention", "choose_backend", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "xformers", "math")
log = logging.getLogger(__name__)
_probe_cache: dict[str, bool] = {}
_announced: set[str] = set()


def _xformers_ops() -> ModuleType | None:
    try:
        import xformers.ops as xops  # optional dependency
    except Exception:  # ImportError, or a broken install raising anything at import
        return None
    return xops if hasattr(xops, "memory_efficient_attention") else None


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _kernels_load(xops: ModuleType, device: torch.device, dtype: torch.dtype) -> bool:
    key = f"{id(xops)}:{device}:{dtype}"
    if key not in _probe_cache:
        try:
            q = torch.zeros(1, 4, 1, 8, device=device, dtype=dtype)
            xops.memory_efficient_attention(q, q, q)
            _probe_cache[key] = True
        except Exception as err:  # any kernel failure means "use SDPA"
            log.info("xformers kernels do not run on %s (%s); using torch SDPA", device, err)
            _probe_cache[key] = False
    return _probe_cache[key]


def choose_backend(q: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto") -> str:
    """Which kernel `attention` will use for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend in ("sdpa", "math"):
        return backend
    usable = False
    if _on_cuda(q) and mask is None:  # xformers is imported only where it could run (not on every CPU call,
        xops = _xformers_ops()  # which also broke torch.compile's graph at every attention)
        usable = xops is not None and _kernels_load(xops, q.device, q.dtype)
    if backend == "xformers" and not usable:
        raise RuntimeError(
            "attention backend 'xformers' was requested but is unusable here (it needs CUDA tensors, "
            "no explicit mask, and an xformers build whose kernels load); use backend='auto'"
        )
    return "xformers" if usable else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on `[batch, heads, tokens, head_dim]` tensors.

    `mask` is additive (float) or boolean (True = attend), broadcastable to `[B, H, Lq, Lk]`.
    """
    chosen = choose_backend(q, mask, backend)
    if chosen not in _announced:
        _announced.add(chosen)
        log.info("attention backend: %s", chosen)
    if chosen == "xformers":
        xops = _xformers_ops()
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        )
        return out.transpose(1, 2)
    if chosen == "math":
        return _math_attention(q, k, v, mask, causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _math_attention(q, k, v, mask, causal, dropout_p):
    """Reference implementation (explicit softmax), for debugging numerical differences."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
