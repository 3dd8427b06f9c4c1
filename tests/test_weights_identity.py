"""Adapter files and checkpoints know which frozen weights they were trained on: a file on other weights of the
same architecture is refused, naming both, unless the user says it is meant; a later dtype cast keeps the
identity; a frozen backbone with random weights is announced loudly before training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmpeft.backbones import TimmViT
from mmpeft.cli import main
from mmpeft.core.errors import AdapterMismatch
from mmpeft.core.identity import RANDOM_INIT, record_weights, weights_identity
from mmpeft.core.model import PeftModel
from mmpeft.core.state import adapter_from_file, load_adapter, read_adapter, save_adapter
from mmpeft.tasks.base import random_frozen_backbone_warning
from tests.toys import write_ramp_images

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def vit(seed: int, **kwargs) -> TimmViT:
    torch.manual_seed(seed)
    return TimmViT("test_vit", img_size=32, **kwargs)


def trained(seed: int = 0, method: str = "lora") -> PeftModel:
    model = PeftModel(vit(seed), method, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return model


def test_an_adapter_on_other_frozen_weights_is_refused_naming_both(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(trained(seed=0), path)
    header = read_adapter(path)[1]
    assert header["weights"]["backbone"]["source"] == RANDOM_INIT and header["weights"]["backbone"]["fingerprint"]
    same = PeftModel(vit(0), "lora", num_classes=3)
    load_adapter(same, path)  # the same weights: loads
    other = PeftModel(vit(1), "lora", num_classes=3)
    before = {k: v.clone() for k, v in other.trainable_state_dict().items()}
    with pytest.raises(AdapterMismatch, match="other frozen backbone weights") as err:
        load_adapter(other, path)
    message = str(err.value)
    assert header["weights"]["backbone"]["fingerprint"] in message and "allow_other_weights true" in message
    assert all(torch.equal(before[k], v) for k, v in other.trainable_state_dict().items()), "nothing written"
    with pytest.warns(UserWarning, match="loading it anyway"):
        load_adapter(other, path, allow_other_weights=True)
    with pytest.raises(AdapterMismatch, match="other frozen"):
        adapter_from_file(vit(2), path)


def test_the_identity_names_the_weights_file_and_survives_a_dtype_cast(tmp_path):
    weights = tmp_path / "my_checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in vit(5).state_dict().items()}, str(weights))
    backbone = vit(0, weights=str(weights))
    identity = weights_identity(backbone)
    assert identity.source == "my_checkpoint.safetensors" and not identity.is_random
    assert identity.fingerprint() == weights_identity(vit(5)).fingerprint(), "the same tensors, the same print"
    path = tmp_path / "a.safetensors"
    save_adapter(PeftModel(backbone, "lora", num_classes=3), path)
    cast = vit(1, weights=str(weights)).to(torch.bfloat16)  # cast after loading: the identity is kept
    load_adapter(PeftModel(cast, "lora", num_classes=3), path)
    with pytest.raises(AdapterMismatch, match="'my_checkpoint.safetensors'.*'random init'"):
        load_adapter(PeftModel(vit(1), "lora", num_classes=3), path)


def test_tensors_trained_in_place_are_not_part_of_the_frozen_fingerprint(tmp_path):
    """BitFit trains the backbone's biases: a file holding them does not depend on where they started."""

    def moved_biases() -> TimmViT:
        backbone = vit(0)
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                if name.endswith("bias"):
                    p.add_(1.0)
        record_weights(backbone, "biases moved")
        return backbone

    bitfit, lora = tmp_path / "bitfit.safetensors", tmp_path / "lora.safetensors"
    save_adapter(trained(seed=0, method="bitfit"), bitfit)
    save_adapter(trained(seed=0), lora)
    load_adapter(PeftModel(moved_biases(), "bitfit", num_classes=3), bitfit)
    with pytest.raises(AdapterMismatch, match="other frozen"):  # LoRA's frozen set includes the biases
        load_adapter(PeftModel(moved_biases(), "lora", num_classes=3), lora)


def test_the_cli_refuses_an_adapter_on_other_weights_and_takes_the_override(tmp_path, capsys):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    for seed, path in ((0, first), (1, second)):
        save_file({k: v.contiguous() for k, v in vit(seed).state_dict().items()}, str(path))
    base = ["-c", str(ROOT / "configs/image_list.yaml"), *QUICK, f"--run.dir={tmp_path / 'runs'}",
            "--model.init_args.backbone.init_args.name=test_vit", "--model.init_args.backbone.init_args.img_size=32",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]  # fmt: skip
    data = write_ramp_images(tmp_path / "data", {"train": 6, "val": 3, "test": 3})
    base.append(f"--data.init_args.root={data}")
    assert main(["fit", *base, "--trainer.max_epochs=1", f"--model.init_args.backbone.init_args.weights={first}"]) == 0
    (adapter,) = (tmp_path / "runs").rglob("version_0/adapter.safetensors")
    args = ["test", *base, f"--adapter={adapter}", f"--model.init_args.backbone.init_args.weights={second}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'first.safetensors'" in err and "'second.safetensors'" in err and "allow_other_weights" in err
    assert main([*args, "--model.init_args.allow_other_weights=true"]) == 0


def test_a_random_frozen_backbone_is_announced_and_full_fine_tuning_is_not():
    warning = random_frozen_backbone_warning(PeftModel(vit(0), "lora", num_classes=3))
    assert warning and "RANDOM weights" in warning and "init_args.weights" in warning
    assert random_frozen_backbone_warning(PeftModel(vit(0), "full", num_classes=3)) is None, "scratch is deliberate"
    backbone = vit(0)
    record_weights(backbone, "pretrained.safetensors")
    assert random_frozen_backbone_warning(PeftModel(backbone, "lora", num_classes=3)) is None


def test_fit_on_a_random_frozen_backbone_says_so_before_training(tmp_path, capsys):
    args = ["fit", "-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false",
            *QUICK, "--trainer.max_epochs=1", f"--run.dir={tmp_path}", "--trainer.limit_train_batches=1"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "WARNING: the frozen backbone 'digits_vit' holds RANDOM weights" in out
    assert any("RANDOM weights" in str(w.message) for w in caught)
