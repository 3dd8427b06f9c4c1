"""Adapter files: contents, sizes, and refusals that leave the model untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft.backbones import TimmViT
from mmpeft.core.errors import AdapterMismatch
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.core.state import adapter_from_file, load_adapter, read_adapter, save_adapter

TINY = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}


def model(method="lora", classes=3, **config):
    torch.manual_seed(0)
    return PeftModel(TimmViT("vit_base_patch16_224", **TINY), create_method(method, **config), num_classes=classes)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m, before):
    return all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_file_holds_exactly_the_declared_set_and_config(tmp_path):
    m = model(r=4)
    size = save_adapter(m, tmp_path / "a.safetensors")
    tensors, header = read_adapter(tmp_path / "a.safetensors")
    assert set(tensors) == set(m.trainable_names())
    config = {"r": 4, "alpha": None, "dropout": 0.0, "targets": None, "b_lr_ratio": 1.0, "init": "kaiming",
              "param_dtype": "float32", "head_init": None}  # fmt: skip
    assert header["method"] == {"name": "lora", "config": config}
    assert header["head"] == {"name": "linear", "num_classes": 3} and header["mmpeft_version"]
    assert header["backbone"]["name"] == "vit_base_patch16_224"
    n = sum(t.numel() for t in tensors.values())
    assert n * 4 < size < n * 4 + 4096, "float32 tensors plus a small header"


def test_full_size_lora_file_is_about_a_megabyte(tmp_path):
    torch.manual_seed(0)
    m = PeftModel(TimmViT("vit_base_patch16_224"), "lora", num_classes=100)
    size = save_adapter(m, tmp_path / "vit_b16_lora.safetensors")
    assert (294_912 + 76_900) * 4 < size < (294_912 + 76_900) * 4 + 16_384  # 1.49 MB vs 343 MB for the backbone


def test_rebuild_from_the_file_alone(tmp_path):
    m = model(r=2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapter(m, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    rebuilt = adapter_from_file(TimmViT("vit_base_patch16_224", **TINY), tmp_path / "a.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), m.eval()(x))


def test_other_method_config_is_refused(tmp_path):
    save_adapter(model(r=4), tmp_path / "a.safetensors")
    target = model(r=8)
    before = snapshot(target)
    with pytest.raises(
        AdapterMismatch,
        match=r"holds method 'lora' \{'r': 4.*but the model has 'lora' \{'r': 8.*\(r=4 in the file vs 8\)",
    ):
        load_adapter(target, tmp_path / "a.safetensors")
    assert unchanged(target, before)


def test_head_for_another_number_of_classes_is_refused(tmp_path):
    save_adapter(model(classes=3), tmp_path / "a.safetensors")
    target = model(classes=10)
    before = snapshot(target)
    with pytest.raises(AdapterMismatch, match="another number of classes"):
        load_adapter(target, tmp_path / "a.safetensors")
    assert unchanged(target, before)


def test_foreign_and_missing_files_are_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "timm.safetensors"))
    with pytest.raises(AdapterMismatch, match="not an mmpeft adapter file"):
        load_adapter(model(), tmp_path / "timm.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(AdapterMismatch, match="not a safetensors adapter file"):
        load_adapter(model(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_adapter(model(), tmp_path / "nope.safetensors")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_adapter(model(r=2), path)
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mmpeft.core.state.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model(r=4), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"], "no temporary files left behind"


@pytest.mark.parametrize(
    "damage",
    [{"method": "{not json"}, {"backbone": None}, {"method": '{"config": {}}'}, {"backbone": '"a string"'}],
    ids=["broken-json", "no-backbone", "no-method-name", "backbone-not-a-mapping"],
)
def test_a_damaged_header_is_named_not_a_bare_key_error(tmp_path, damage):
    path = tmp_path / "a.safetensors"
    save_adapter(model(), path)
    with safe_open(str(path), framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in damage.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(AdapterMismatch, match="damaged header"):
        load_adapter(model(), path)
