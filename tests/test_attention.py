"""The attention entry point: xformers only on CUDA with loadable kernels; otherwise SDPA, same outputs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mmpeft.core import attention as attn_mod


def _fake_xformers(monkeypatch, kernels_load: bool = True) -> dict:
    calls = {"n": 0}

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        if not kernels_load:
            raise NotImplementedError("no operator found for this device")
        calls["n"] += 1
        causal = attn_bias is not None
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = lambda: "causal"
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attn_mod, "_probe_cache", {})
    return calls


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 9, 8, generator=g) for _ in range(3)]


def test_sdpa_without_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    q, k, v = qkv()
    assert attn_mod.choose_backend(q) == "sdpa"
    torch.testing.assert_close(attn_mod.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_xformers_importable_but_tensors_on_cpu_uses_sdpa(monkeypatch):
    calls = _fake_xformers(monkeypatch)
    q, k, v = qkv()
    assert attn_mod.choose_backend(q) == "sdpa"
    attn_mod.attention(q, k, v)
    assert calls["n"] == 0


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_chosen_on_cuda_when_kernels_load_with_identical_outputs(monkeypatch, causal):
    calls = _fake_xformers(monkeypatch)
    monkeypatch.setattr(attn_mod, "_on_cuda", lambda t: True)  # pretend the tensors live on a GPU
    q, k, v = qkv()
    assert attn_mod.choose_backend(q) == "xformers"
    out = attn_mod.attention(q, k, v, causal=causal)
    assert calls["n"] >= 2  # the one-off probe and the call itself
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-6, rtol=0)


def test_xformers_whose_kernels_fail_falls_back_to_sdpa(monkeypatch):
    _fake_xformers(monkeypatch, kernels_load=False)
    monkeypatch.setattr(attn_mod, "_on_cuda", lambda t: True)
    q, k, v = qkv()
    assert attn_mod.choose_backend(q) == "sdpa"
    torch.testing.assert_close(attn_mod.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(RuntimeError, match="unusable"):
        attn_mod.attention(q, k, v, backend="xformers")


def test_explicit_mask_keeps_sdpa(monkeypatch):
    _fake_xformers(monkeypatch)
    monkeypatch.setattr(attn_mod, "_on_cuda", lambda t: True)
    q, k, v = qkv()
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    assert attn_mod.choose_backend(q, mask) == "sdpa"


@pytest.mark.parametrize("causal", [False, True])
def test_math_reference_matches_sdpa(causal):
    q, k, v = qkv(1)
    mask = torch.randn(9, 9)
    torch.testing.assert_close(
        attn_mod.attention(q, k, v, mask=None if causal else mask, causal=causal, backend="math"),
        attn_mod.attention(q, k, v, mask=None if causal else mask, causal=causal, backend="sdpa"),
        atol=1e-5, rtol=0,
    )  # fmt: skip


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_mod.attention(q, k, v, backend="flash9")
