"""Exact trainable counts on full-size ViT-B/16 (built on the meta device) and the `params` table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmpeft.backbones import TimmViT
from mmpeft.cli import main, params_table
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report

VIT_B16_PARAMS = 85_798_656  # timm's vit_base_patch16_224 without its head


def report(method: str, num_classes: int = 100, **config):
    backbone = TimmViT("vit_base_patch16_224", device="meta")
    return parameter_report(PeftModel(backbone, create_method(method, **config), num_classes=num_classes))


@pytest.mark.parametrize(
    ("method", "config", "expected"),
    [
        ("lora", {"r": 8}, 294_912),
        ("lora", {"r": 16}, 589_824),
        ("adapter", {"bottleneck": 8}, 156_768),
        ("adapter", {"bottleneck": 64}, 1_189_632),
        ("adapter", {"bottleneck": 16, "norm": True}, 304_320 + 18_432),
        ("bitfit", {}, 102_912),
        ("svfit", {}, 12 * 2 * 768),  # full spectrum of q and v (the configs ship the paper's energy ranks, <= this)
        ("difffit", {}, 102_912 + 25 * 768 + 6 * (3 * 768 + 2 * 768 + 768)),  # BitFit + LN weights + γ, blocks 0-5
        ("linear", {}, 0),
        ("full", {}, VIT_B16_PARAMS),
    ],
)
def test_vit_b16_counts_match_the_spec(method, config, expected):
    r = report(method, **config)
    assert r.backbone == VIT_B16_PARAMS
    assert r.trainable_no_head == expected
    assert r.trainable == expected + 769 * 100


@pytest.mark.parametrize("classes", [2, 100, 397])
def test_linear_head_is_769_per_class(classes):
    assert report("linear", num_classes=classes).trainable == 769 * classes


def test_params_table_rows_and_percentages():
    rows = {r["method"]: r for r in params_table("vit_base_patch16_224", num_classes=100)}
    assert rows["lora"]["no head"] == 294_912 and rows["lora"]["trainable"] == 294_912 + 76_900
    assert rows["full"]["% of backbone"] == "100.000"
    assert rows["bitfit"]["% of backbone"] == f"{100 * 102_912 / VIT_B16_PARAMS:.3f}"


def test_params_table_marks_token_methods_on_other_families():
    rows = {r["method"]: r for r in params_table("test_convnext", num_classes=10)}
    assert rows["adapter"]["trainable"] == "n/a" and "TokenBackbone" in rows["adapter"]["note"]
    assert rows["bitfit"]["trainable"] > 0


def test_params_cli(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 371,812 | 294,912 |" in out
    assert main(["params", "--backbone", "no_such_net"]) == 2
    assert "unknown backbone 'no_such_net'" in capsys.readouterr().err


def test_params_rejects_a_preset_that_no_method_has(capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", "--preset", "papr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmpeft: error: no method has preset 'papr' (did you mean paper?)")
    assert "known presets: default, paper, paper_cars, paper_fgvc, paper_shallow" in err


def test_params_marks_methods_that_lack_a_known_preset():
    rows = {r["method"]: r for r in params_table("test_convnext", num_classes=10, preset="paper_shallow")}
    assert rows["vpt"]["note"] == "needs a TokenBackbone"  # vpt has the preset; the convnet is the reason
    assert rows["lora"]["trainable"] == "n/a" and rows["lora"]["note"] == "no preset 'paper_shallow'"
    assert rows["adapter"]["note"] == "no preset 'paper_shallow'"  # the missing preset, not the backbone


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mmpeft.cli", "params", "--backbone", "vit_base_patch16_224", "--num-classes", "10"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert "| adapter | 164,458 | 156,768 |" in out.stdout


# -- denoisers, full size on the meta device ------------------------------------------

SD15_UNET = {  # Stable Diffusion 1.5's unet/config.json (the values that differ from diffusers' defaults)
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
DIT_XL_2 = {  # facebook/DiT-XL-2-256 transformer/config.json
    "num_layers": 28,
    "attention_head_dim": 72,
    "num_attention_heads": 16,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 32,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
}


@pytest.mark.parametrize(
    ("method", "expected"),
    [({"name": "lora", "r": 4}, 797_184), ({"name": "lora", "r": 16}, 3_188_736), ("bitfit", 343_684)],
)
def test_sd15_unet_counts_match_the_spec(method, expected):
    """LoRA on the 128 attention linears (to_q, to_k, to_v, to_out.0), BitFit on every bias."""
    from mmpeft.backbones import DiffusersUNet

    r = parameter_report(PeftModel(DiffusersUNet(config=SD15_UNET, device="meta"), method))
    assert (r.backbone, r.trainable, r.head) == (859_520_964, expected, 0)


def test_diffusers_dit_xl_counts_match_the_spec():
    """diffusers' DiT-XL/2 keeps a timestep MLP and class table per block: 749,826,464 parameters, 551,840 biases."""
    from mmpeft.backbones import DiffusersDiT

    r = parameter_report(PeftModel(DiffusersDiT(config=DIT_XL_2, device="meta", tie_embeddings=False), "bitfit"))
    assert (r.backbone, r.trainable) == (749_826_464, 551_840)


def test_tied_dit_xl_counts_are_the_original_layouts():
    """Tied (the default), diffusers' DiT-XL/2 has the original DiT's one timestep MLP and class table: 27 x
    2,777,472 fewer parameters, BitFit 489,632 (the original's biases), + a Food-101 table = the paper's 0.61M."""
    from mmpeft.backbones import DiffusersDiT

    r = parameter_report(PeftModel(DiffusersDiT(config=DIT_XL_2, device="meta"), "bitfit"))
    assert (r.backbone, r.trainable) == (749_826_464 - 27 * 2_777_472, 489_632) == (674_834_720, 489_632)
    food = DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=101)
    tables = [p.numel() for n, p in food.named_parameters() if n.endswith("class_embedder.embedding_table.weight")]
    assert tables == [102 * 1152] and 489_632 + sum(tables) == 607_136


def test_params_table_on_denoisers_has_no_head_and_marks_token_methods():
    from mmpeft.backbones import create_backbone

    rows = {r["method"]: r for r in params_table("tiny_sd_unet")}
    plain = create_backbone("tiny_sd_unet")
    biases = sum(p.numel() for n, p in plain.named_parameters() if n.endswith("bias"))
    assert rows["bitfit"]["trainable"] == rows["bitfit"]["no head"] == biases
    assert rows["lora"]["trainable"] == 2 * 23_040  # default r = 8 on q, k, v, out (r = 4: diffusers' 23,040)
    assert rows["full"]["trainable"] == 1_427_012
    assert rows["vpt"]["note"] == "needs a TokenBackbone" and rows["linear"]["trainable"] == "n/a"
    assert rows["lora"]["at inference"] == 0 and rows["ssf"]["at inference"] == 0


def test_params_table_on_the_quickstart_backbones_builds_without_pretraining():
    from mmpeft.cli import params_table

    rows = {r["method"]: r for r in params_table("digits_vit", num_classes=10)}
    assert rows["linear"]["trainable"] == 1_290 and rows["full"]["trainable"] == 797_578
    assert params_table("shapes_point", num_classes=15)
