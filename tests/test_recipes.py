"""Every shipped config holds the official recipe it cites (`tests/recipes.py`: the values and where they
were read), and the `paper` presets build what the official code builds: heads, NOAH's LoRA, SSF's
timm schedule, MoSA's experts and LayerNorm, CLIP-LoRA's count."""

from __future__ import annotations

import math
import pathlib

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mmpeft.backbones import TimmViT
from mmpeft.cli import run_cli
from mmpeft.core.method import create_method, get_method
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from tests.recipes import HEAD_INITS, RECIPES

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def printed(path: pathlib.Path, capsys) -> dict:
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", str(path), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def lookup(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


def same(actual, expected) -> bool:
    if isinstance(expected, float) and not isinstance(expected, bool):
        return isinstance(actual, int | float) and math.isclose(actual, expected, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(expected)
            and all(same(a, e) for a, e in zip(actual, expected))
        )
    return actual == expected


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_config_holds_the_official_recipe(name, capsys):
    config = printed(CONFIGS / name, capsys)
    wrong = {
        key: (lookup(config, key), want) for key, want in RECIPES[name].items() if not same(lookup(config, key), want)
    }
    assert not wrong, f"{name} differs from its official recipe (config, official): {wrong}"


@pytest.mark.parametrize("method", sorted(HEAD_INITS))
def test_paper_presets_initialise_the_head_as_the_official_code(method):
    assert get_method(method).preset("paper").head_init == HEAD_INITS[method]
    assert create_method(method).head_init is None, "mmpeft's default keeps PyTorch's head init"


def test_vpt_head_has_kaiming_fan_out_weights_and_the_prior_bias():
    torch.manual_seed(0)
    vit = lambda: TimmViT("test_vit", img_size=32, embed_dim=256, num_heads=4)
    model = PeftModel(vit(), create_method("vpt", preset="paper"), num_classes=500)
    assert torch.allclose(model.head.bias, torch.full((500,), -math.log(99)))
    assert abs(model.head.weight.std().item() - math.sqrt(2 / 500)) < 0.002  # kaiming normal, fan_out = 500
    ssf = PeftModel(vit(), create_method("ssf", preset="paper"), num_classes=500)
    assert torch.count_nonzero(ssf.head.bias) == 0 and abs(ssf.head.weight.std().item() - 0.02) < 0.001


def test_lora_paper_preset_is_noah_s_one_pair_on_the_fused_qkv():
    """Same count as the default's q and v pairs (294,912 on ViT-B/16), a different structure: one A shared by
    q, k and v and one B of width 3d; dropout 0.1; the intended kaiming / zero init (the identity at step 0)."""
    torch.manual_seed(0)
    backbone = lambda: TimmViT("test_vit", img_size=32, embed_dim=64, num_heads=4, depth=2)
    paper = PeftModel(backbone(), create_method("lora", preset="paper"), num_classes=3)
    lora = paper.backbone.blocks[0].attn.qkv.lora
    assert (
        list(lora.deltas) == ["all"]
        and lora.deltas["all"].B.shape == (192, 8)
        and lora.deltas["all"].A.shape == (8, 64)
    )
    assert lora.deltas["all"].dropout.p == 0.1 and lora.deltas["all"].scale == 1.0
    assert torch.count_nonzero(lora.deltas["all"].B) == 0 and lora.deltas["all"].A.abs().max() <= 1 / math.sqrt(64)
    default = PeftModel(backbone(), "lora", num_classes=3).backbone.blocks[0].attn.qkv.lora
    assert list(default.deltas) == ["q", "v"]
    released = create_method("lora", preset="paper", init="trunc_normal")
    start = PeftModel(backbone(), released, num_classes=3).backbone.blocks[0].attn.qkv.lora.deltas["all"]
    assert torch.count_nonzero(start.B) > 0 and abs(start.A.std().item() - 0.02) < 0.005, "NOAH's released start"
    count = parameter_report(PeftModel(TimmViT("vit_base_patch16_224", device="meta"), "lora", num_classes=0))
    noah = parameter_report(PeftModel(TimmViT("vit_base_patch16_224", device="meta"),
                                      create_method("lora", preset="paper"), num_classes=0))  # fmt: skip
    assert count.trainable == noah.trainable == 294_912


def test_ssf_schedule_is_timm_s_cosine_with_cooldown():
    """The FGVC SSF config's schedule, through the task, against timm's CosineLRScheduler built with SSF's
    script arguments (--epochs 100 --warmup-epochs 10 --warmup-lr 1e-7 --min-lr 1e-8, cooldown 10)."""
    from timm.scheduler import CosineLRScheduler

    from mmpeft.tasks import ImageClassification

    recipe = yaml.safe_load((CONFIGS / "fgvc/ssf.yaml").read_text())["model"]["init_args"]
    options = {k: recipe[k] for k in ("lr", "weight_decay", "warmup_epochs", "min_lr", "schedule", "warmup_lr",
                                      "cooldown_epochs", "optimizer")}  # fmt: skip
    task = ImageClassification(backbone=TimmViT("test_vit", img_size=32), method="ssf", num_classes=3, **options)
    task.trainer = pl.Trainer(max_epochs=110, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    configured = task.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(scheduler, CosineLRScheduler)
    ours = {}
    for epoch in range(110):  # stepped as the fit loop steps it: through the task's hook at each epoch's end
        ours[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        task.trainer.fit_loop.epoch_progress.current.completed = epoch
        task.lr_scheduler_step(scheduler, None)
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    timm = CosineLRScheduler(probe, t_initial=100, lr_min=1e-8, warmup_lr_init=1e-7, warmup_t=10, cycle_limit=1,
                             t_in_epochs=True)  # fmt: skip
    for epoch in (0, 5, 10, 50, 99, 100, 105, 109):
        timm.step(epoch)
        assert ours[epoch] == probe.param_groups[0]["lr"], epoch
    assert ours[105] == pytest.approx(1e-8) and ours[50] == pytest.approx(0.005, rel=1e-3)


def test_mosa_expert_draws_layernorm_and_backbone_dropout():
    from mmpeft.core.anatomy import ForwardContext
    from mmpeft.methods.mosa import MoSA

    model = PeftModel(TimmViT("test_vit", img_size=32, dropout=0.1), create_method("mosa", share="none", experts=4),
                      num_classes=3).train()  # fmt: skip
    adapter = MoSA.adapters(model.backbone)[0]
    assert adapter.norm.eps == 1e-6
    pairs = set()
    for seed in range(40):
        ctx = ForwardContext(generator=torch.Generator().manual_seed(seed))
        adapter(torch.zeros(1, 2, 64), ctx, x_in=torch.randn(1, 2, 64))
        pairs.add((ctx.draws["mosa.expert.0.down"], ctx.draws["mosa.expert.0.up"]))
    assert any(d != u for d, u in pairs), "share='none' draws the down and up experts independently"
    block = model.backbone.blocks[0]
    assert block.mlp.drop1.p == block.mlp.drop2.p == model.backbone.pos_drop.p == 0.1
    assert isinstance(block.attn.proj_drop, torch.nn.Identity) and block.attn.attn_drop == 0.0
    assert block.mlp.drop1.training, "MoSA keeps the frozen ViT's dropout active in training (frozen_mode train)"


def test_clip_lora_config_trains_184_320_on_vit_b16(capsys):
    """CLIP-LoRA's r=2 on q, k and v of every block of both towers of ViT-B/16: 110,592 + 73,728."""
    from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
    from mmpeft.core.method import method_from_spec

    config = printed(CONFIGS / "clip/lora.yaml", capsys)["model"]["init_args"]
    image = PeftModel(ClipImageTower("ViT-B-16", device="meta"), method_from_spec(config["method"]), num_classes=0)
    text = PeftModel(ClipTextTower("ViT-B-16", device="meta"), method_from_spec(config["text_method"]), num_classes=0)
    assert parameter_report(image).trainable == 110_592 and parameter_report(text).trainable == 73_728
    delta = image.backbone.blocks[0].attn.qkv.lora.deltas["q"]
    assert delta.scale == pytest.approx(1 / math.sqrt(2)) and delta.dropout.p == 0.25  # alpha / sqrt(r) as released
