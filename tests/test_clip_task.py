"""CLIP classification: the zero-shot head equals open_clip's similarity; PEFT starts from zero-shot."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
from mmpeft.core.state import read_adapter, save_adapter
from mmpeft.tasks.clip import CLIPClassification, resolve_class_names

NAMES = ["dog", "cat", "car"]


def clip_with_real_vocab(seed: int = 0) -> CLIP:
    """Tiny widths, but open_clip's real vocabulary and context, so its tokenizer's ids fit."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIPTextCfg(width=32, heads=4, layers=2)).eval()


def task(clip, **kw) -> CLIPClassification:
    return CLIPClassification(ClipImageTower(model=clip), ClipTextTower(model=clip), NAMES, **kw).eval()


def test_zero_shot_logits_equal_open_clip_similarity():
    clip = clip_with_real_vocab()
    scale = float(clip.logit_scale.exp())
    model = task(clip, method="linear", logit_scale=scale)
    x = torch.randn(4, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(model(x), scale * image @ text.t(), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0, "zero-shot trains nothing"


def test_templates_are_averaged_and_renormalised():
    clip = clip_with_real_vocab()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    head = task(clip, templates=templates).model.head
    weights = head.weights()
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3))
    assert head.token_ids.shape[:2] == (3, 2)


def test_vl_pet_starts_at_zero_shot_and_lora_text_method_trains_the_text_tower(tmp_path):
    clip = clip_with_real_vocab()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        zero_shot = task(clip, method="linear")(x)
        adapted = task(clip, method="vl_pet", text_method={"name": "lora", "r": 2, "targets": ["attn.qkv"]})
        assert torch.equal(adapted(x), zero_shot), "identity-initialised VL-PET + LoRA keep the zero-shot logits"
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(".lora." in n and "text_tower" in n for n in trainable)
    assert not any("text_tower" in n and ".lora." not in n for n in trainable), "the rest of the text tower is frozen"
    save_adapter(adapted.model, tmp_path / "a.safetensors")
    tensors, _ = read_adapter(tmp_path / "a.safetensors")
    assert set(tensors) == set(adapted.model.trainable_names())
    assert not any(k.startswith("head.text_tower.token_embedding") for k in tensors)


def test_class_names_from_dataset_metadata():
    assert resolve_class_names("vtab1k:eurosat")[:2] == ["AnnualCrop", "Forest"]
    assert resolve_class_names("vtab1k:oxford_iiit_pet")[1] == "american bulldog"
    assert resolve_class_names("vtab1k:sun397")[8] == "apartment building (outdoor)"
    assert resolve_class_names("vtab1k:oxford_flowers102")[0] == "pink primrose"
    with pytest.raises(ValueError, match="no class names for 'dmlab'"):
        resolve_class_names("vtab1k:dmlab")


def test_linear_probe_from_zero_shot_keeps_the_argmax_at_step_0():
    clip = clip_with_real_vocab()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        zero_shot = task(clip, method="linear")(x)
        probe = task(clip, method="linear", train_classifier=True)
        assert torch.equal(probe(x).argmax(-1), zero_shot.argmax(-1))
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"model.head.classifier"}


def test_few_shot_cli_run_end_to_end(tmp_path):
    import json
    from pathlib import Path

    from mmpeft.cli import run_cli
    from mmpeft.data.fixtures import write_vtab_fixture

    write_vtab_fixture(tmp_path / "data", ["eurosat"], test_size=20)
    config = Path(__file__).resolve().parents[1] / "configs/clip/vl_pet_large.yaml"
    cli = run_cli([
        "fit", "-c", str(config), f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.image_size=32",
        "--data.init_args.shots=2", "--data.init_args.num_workers=0", "--data.init_args.batch_size=10",
        "--model.init_args.backbone.init_args.name=mmpeft-tiny-clip", "--model.init_args.tokenizer=ViT-B-32",
        "--model.init_args.text_tower.init_args.name=mmpeft-tiny-clip", "--trainer.max_epochs=1",
        f"--run.dir={tmp_path / 'runs'}", "--run.wandb=disabled", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert len(cli.datamodule.items["train"]) == 2 * 10, "2 shots x 10 EuroSAT classes"
    summary = json.loads((tmp_path / "runs/clip-vl_pet_large/version_0/summary.json").read_text())
    assert summary["test_acc"] is not None and summary["method"] == "vl_pet"
    assert summary["trainable"] == summary["trainable_no_head"], "the zero-shot head itself is frozen"


def test_class_weights_are_computed_once_frozen_and_once_per_evaluation_with_a_text_method():
    clip = clip_with_real_vocab()
    frozen = task(clip, method="linear").model.head
    assert "frozen_weights" in dict(frozen.named_buffers()) and "frozen_weights" not in frozen.state_dict()
    adapted = task(clip, method="linear", text_method={"name": "lora", "r": 2, "targets": ["attn.qkv"]}).model.head
    calls = []
    adapted.text_tower.register_forward_hook(lambda *_: calls.append(1))
    features = torch.randn(2, 32)
    adapted.eval()
    with torch.no_grad():
        adapted(features), adapted(features)
    assert len(calls) == 1, "one text forward per evaluation"
    adapted.train()
    adapted(features), adapted(features)
    assert len(calls) == 3, "every training step re-encodes the prompts"
    adapted.eval()
    with torch.no_grad():
        adapted(features)
    assert len(calls) == 4, "a new evaluation sees the updated text tower"
