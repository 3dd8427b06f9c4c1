"""timm ViTs in the token anatomy: equal outputs and keys, local weights in every format, clear errors."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from mmpeft.backbones import TimmModel, TimmViT, create_backbone
from mmpeft.core.errors import NotSupported, UnknownName, WeightsUnavailable
from mmpeft.core.model import PeftModel

TINY = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
VARIANTS = [
    pytest.param("test_vit", {}, 64, id="plain-dynamic-size"),
    pytest.param("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2}, 28, id="registers-layerscale"),
    pytest.param("vit_base_patch16_224", {**TINY, "global_pool": "avg", "init_values": 1e-5}, 32, id="avg-pool"),
    pytest.param("deit3_small_patch16_224", {**TINY}, 32, id="deit3-no-embed-class"),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), VARIANTS)
def test_converted_model_loads_timm_state_dict_and_matches(name, kwargs, size):
    reference = timm.create_model(name, num_classes=0, **kwargs).eval()
    backbone = TimmViT(name, **kwargs)
    assert set(backbone.state_dict()) == set(reference.state_dict()), "timm's own keys"
    backbone.load_state_dict(reference.state_dict(), strict=True)
    backbone.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x))
        tokens, ctx = backbone.forward_tokens(x)
        assert torch.equal(tokens, reference.forward_features(x))
    assert ctx.layout["patches"].stop == tokens.shape[1]


def test_register_tokens_sit_in_the_layout():
    backbone = TimmViT("vit_small_patch14_reg4_dinov2", img_size=28, depth=1)
    _, ctx = backbone.forward_tokens(torch.randn(1, 3, 28, 28))
    assert ctx.layout == {"cls": slice(0, 1), "registers": slice(1, 5), "patches": slice(5, 9)}


@pytest.mark.parametrize("fmt", ["safetensors", "pth-with-head", "nested-state-dict"])
def test_local_weights_file(tmp_path, fmt):
    source = timm.create_model("vit_base_patch16_224", num_classes=7, **TINY).eval()
    state = source.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth-with-head":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    backbone = TimmViT("vit_base_patch16_224", weights=str(path), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), source.forward_head(source.forward_features(x), pre_logits=True))


def _export_google_npz(model: torch.nn.Module, path) -> None:
    """Write a timm ViT in the layout of Google's ViT-B_16.npz (the inverse of timm's loader)."""
    w: dict[str, np.ndarray] = {}
    put = lambda key, t: w.__setitem__(key, t.detach().numpy())
    put("embedding/kernel", model.patch_embed.proj.weight.permute(2, 3, 1, 0))
    put("embedding/bias", model.patch_embed.proj.bias)
    put("cls", model.cls_token)
    put("Transformer/posembed_input/pos_embedding", model.pos_embed)
    put("Transformer/encoder_norm/scale", model.norm.weight)
    put("Transformer/encoder_norm/bias", model.norm.bias)
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        d, h = block.attn.qkv.in_features, block.attn.num_heads
        put(p + "LayerNorm_0/scale", block.norm1.weight)
        put(p + "LayerNorm_0/bias", block.norm1.bias)
        put(p + "LayerNorm_2/scale", block.norm2.weight)
        put(p + "LayerNorm_2/bias", block.norm2.bias)
        for n, wq, bq in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)):
            put(p + f"MultiHeadDotProductAttention_1/{n}/kernel", wq.T.reshape(d, h, -1))
            put(p + f"MultiHeadDotProductAttention_1/{n}/bias", bq.reshape(h, -1))
        put(p + "MultiHeadDotProductAttention_1/out/kernel", block.attn.proj.weight.reshape(d, h, -1).permute(1, 2, 0))
        put(p + "MultiHeadDotProductAttention_1/out/bias", block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            put(p + f"MlpBlock_3/Dense_{r}/kernel", fc.weight.T)
            put(p + f"MlpBlock_3/Dense_{r}/bias", fc.bias)
    np.savez(path, **w)


def test_google_npz_checkpoint(tmp_path):
    source = timm.create_model("vit_base_patch16_224", num_classes=0, **TINY).eval()
    _export_google_npz(source, tmp_path / "ViT-tiny.npz")
    backbone = TimmViT("vit_base_patch16_224", weights=str(tmp_path / "ViT-tiny.npz"), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), source(x), atol=1e-6, rtol=0)


def test_weights_for_another_architecture_are_refused(tmp_path):
    other = timm.create_model("vit_base_patch16_224", num_classes=0, **{**TINY, "embed_dim": 64})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailable, match="another shape.*Is the file for this architecture"):
        TimmViT("vit_base_patch16_224", weights=str(tmp_path / "other.pth"), **TINY)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        TimmViT("vit_base_patch16_224", weights=str(tmp_path / "missing.safetensors"), **TINY)


def test_pickled_objects_are_not_loaded(tmp_path):
    torch.save({"weights": torch.zeros(1), "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsUnavailable, match="weights_only"):
        TimmViT("vit_base_patch16_224", weights=str(tmp_path / "evil.pth"), **TINY)


def test_offline_hub_name_fails_fast_and_clearly(monkeypatch):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="offline.*weights=path/to/model.safetensors"):
        TimmViT("vit_base_patch16_224", pretrained=True, **TINY)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(WeightsUnavailable, match="not reachable"):
        TimmViT("vit_base_patch16_224", pretrained=True, **TINY)
    assert time.perf_counter() - start < 10, "no minutes of retries when offline"


def test_unsupported_timm_family_names_the_methods_that_work():
    any_model = "bitfit, difffit, full, linear, lora, ssf, svfit"
    with pytest.raises(NotSupported, match=rf"does not fit the token anatomy.*TimmModel: {any_model}"):
        TimmViT("test_convnext")
    backbone = create_backbone("test_convnext")
    assert isinstance(backbone, TimmModel)
    with pytest.raises(NotSupported, match=r"'adapter'.*not a TokenBackbone.*ConvNeXt is not a plain timm"):
        PeftModel(backbone, "adapter", num_classes=3)
    model = PeftModel(backbone, "bitfit", num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_backbone_name():
    with pytest.raises(UnknownName, match="unknown backbone 'vit_bass_patch16'"):
        create_backbone("vit_bass_patch16")
    with pytest.raises(NotSupported, match="timm has no model"):
        TimmViT("vit_bass_patch16")
