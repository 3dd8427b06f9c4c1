"""DiffFit (`mmpeft.methods.difffit`) and the tied DiT it needs: the paper's counts on full-size DiT-XL/2 and
SD1.5 (meta device), where γ sits and what it computes, the exact merge of γ and of the added LayerNorm
affines into the adaLN modulation, identity at init, `disabled()`, and the DiT's tied embeddings and fresh
class table. Tiny random models otherwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.backbones import TINY_DIT, DiffusersDiT, DiffusersUNet
from mmpeft.backbones.dit import TiedEmbedding
from mmpeft.core.errors import NotMergeable, NotSupported
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.methods.difffit import BranchScale, NormAffine
from mmpeft.tasks.step import fit_steps
from tests.conftest import tiny_dit, tiny_unet
from tests.test_counts import DIT_XL_2, SD15_UNET

FOOD101 = 101
D_XL = 1152


def _difffit(backbone: nn.Module, preset: str = "default", **options) -> PeftModel:
    return PeftModel(backbone, create_method("difffit", preset=preset, **options))


def _breakdown(model: PeftModel) -> dict[str, int]:
    """Trainable parameters by kind, from their names."""
    kinds = {"gamma": 0, "ln_affine": 0, "table": 0, "bias": 0, "norm_weight": 0}
    for name, p in model.backbone.named_parameters():
        if not p.requires_grad:
            continue
        if ".difffit.gamma_" in name:
            kinds["gamma"] += p.numel()
        elif ".difffit." in name:
            kinds["ln_affine"] += p.numel()
        elif name.endswith("embedding_table.weight"):
            kinds["table"] += p.numel()
        elif name.endswith("bias"):
            kinds["bias"] += p.numel()
        else:
            kinds["norm_weight"] += p.numel()
    return kinds


def _perturb(model: PeftModel, seed: int = 0, std: float = 0.1) -> None:
    """Random values for every trainable tensor (γ and added affines away from 1 / 0), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _dit_batch(backbone: DiffusersDiT, seed: int = 0):
    return backbone.example_batch(2, torch.Generator().manual_seed(seed))


# -- counts on the meta device (Xie et al., DiffFit, ICCV 2023) ------------------------------------------------


def test_dit_xl2_paper_preset_on_food101_is_the_reconstructed_835_232():
    """835,232 is mmpeft's reconstruction of the paper's "0.83M (0.12%)" (Xie et al., DiffFit: bias + Food table +
    added LayerNorm affines + γ on qkv, out-proj and both branches of blocks 1-14), not a count the paper breaks
    down: 0.835M rounds to 0.84M. The released code's layout (no LayerNorm affine) is the next test's 703,904."""
    backbone = DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=FOOD101)
    model = _difffit(backbone, "paper")
    r = parameter_report(model)
    assert r.trainable == 835_232 and r.head == 0
    assert _breakdown(model) == {
        "bias": 489_632,  # 17,280 per block x 28 + patch 1,152 + timestep MLP 2,304 + final 32 + final adaLN 2,304
        "table": 102 * D_XL,  # 117,504: 101 classes + the CFG null row
        "ln_affine": 57 * 2 * D_XL,  # 131,328: 2 LayerNorms per block + the final one
        "gamma": 14 * 6 * D_XL,  # 96,768: γ1 + γ2 + qkv (3d) + out-proj, blocks 1-14
        "norm_weight": 0,  # the stock DiT has no affine LayerNorm
    }
    assert r.backbone == 674_834_720 - 1_153_152 + 117_504  # tied, with the Food-101 table
    assert 0.1235 < 100 * r.trainable / 674_834_720 < 0.1240  # "0.12%"


def test_dit_xl2_released_code_layout_without_layernorm_affine_is_703_904():
    """The released code's count: the same γ layout and trained set, but DiT's LayerNorms keep no affine (the stock
    DiT code's `elementwise_affine=False`), i.e. the paper preset with ln_affine=False: bias 489,632 + Food table
    117,504 + γ 96,768 = 703,904 (0.70M)."""
    backbone = DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=FOOD101)
    model = _difffit(backbone, "paper", ln_affine=False)
    assert parameter_report(model).trainable == 489_632 + 102 * D_XL + 14 * 6 * D_XL == 703_904
    assert _breakdown(model)["ln_affine"] == 0


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"positions": ("branch",), "blocks": "all", "ln_affine": False}, 489_632 + 117_504 + 64_512),  # γ1, γ2 x 28
        ({"positions": ("branch",), "ln_affine": False}, 489_632 + 117_504 + 32_256),  # γ1, γ2 on blocks 1-14
        ({"blocks": (0, 28)}, 738_464 + 28 * 6_912),  # all 28 blocks
        ({"blocks": (24, 28)}, 738_464 + 4 * 6_912),
        ({"positions": (), "ln_affine": False}, 607_136),  # = the paper's BitFit row (bias + Food table)
    ],
)
def test_dit_xl2_counts_follow_the_analytic_formulas(options, expected):
    backbone = DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=FOOD101)
    assert parameter_report(_difffit(backbone, "paper", **options)).trainable == expected


@pytest.mark.parametrize(("resnets", "expected"), [(True, 501_444), (False, 481_284)])
def test_sd15_sd_preset_counts_match_the_spec(resnets, expected):
    model = _difffit(DiffusersUNet(config=SD15_UNET, device="meta"), "sd", resnets=resnets)
    r = parameter_report(model)
    assert (r.backbone, r.trainable) == (859_520_964, expected)
    assert _breakdown(model) == {
        "bias": 343_684,  # norm biases included
        "norm_weight": 100_160,
        "gamma": 37_440 + (20_160 if resnets else 0),  # 3 per transformer block (16); conv2 of 22 ResNets
        "ln_affine": 0,  # every UNet norm is affine already
        "table": 0,
    }
    assert f"{100 * r.trainable / 859_520_964:.3f}" == ("0.058" if resnets else "0.056")


def test_untied_diffusers_dit_trains_28_tables_and_says_so():
    backbone = DiffusersDiT(config=DIT_XL_2, device="meta", tie_embeddings=False)
    with pytest.warns(UserWarning, match="28 separate class tables"):
        model = _difffit(backbone, "paper")
    # the pitfall: 27 extra tables and timestep-MLP bias sets, 2.7M + 1.1M trainable
    assert _breakdown(model)["table"] == 28 * 1_001 * D_XL == 32_288_256
    assert _breakdown(model)["bias"] == 551_840


# -- where γ goes, and what it computes ---------------------------------------------------------------------


def _pieces(model: PeftModel) -> dict[str, tuple[str, ...]]:
    return {
        name.removeprefix("model."): tuple(sorted(n for n, _ in m.named_parameters()))
        for name, m in model.backbone.named_modules()
        if isinstance(m, BranchScale | NormAffine)
    }


def test_dit_gamma_positions_in_the_first_half():
    model = _difffit(tiny_dit(num_layers=4))
    pieces = _pieces(model)
    expected = {}
    for i in (0, 1):  # the first half of 4 blocks
        block = f"transformer_blocks.{i}"
        expected |= {f"{block}.attn1.to_{x}.difffit": ("gamma_qkv",) for x in "qkv"}  # 3·d
        expected[f"{block}.attn1.to_out.0.difffit"] = ("gamma_branch", "gamma_proj")  # γ1 and out-proj γ
        expected[f"{block}.ff.net.2.difffit"] = ("gamma_branch",)  # γ2
    assert {k: v for k, v in pieces.items() if v[0].startswith("gamma")} == expected
    ln = {k for k, v in pieces.items() if v == ("bias", "weight")}
    assert ln == {f"transformer_blocks.{i}.{n}.difffit" for i in range(4) for n in ("norm1.norm", "norm3")} | {
        "norm_out.difffit"
    }


def test_unet_sd_preset_positions():
    model = _difffit(tiny_unet(), "sd")
    pieces = _pieces(model)
    blocks = [n for n, m in model.backbone.model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    resnets = [n for n, m in model.backbone.model.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    expected = {f"{b}.{layer}.difffit" for b in blocks for layer in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")}
    expected |= {f"{r}.conv2.difffit" for r in resnets}
    assert set(pieces) == expected
    assert all(v in (("gamma_branch",), ("gamma_resnet",)) for v in pieces.values())


def test_token_backbone_gamma_on_qkv_proj_and_fc2_of_the_first_half():
    from mmpeft.backbones import TimmViT

    model = _difffit(TimmViT("test_vit", img_size=32))
    pieces = _pieces(model)
    depth = len(model.backbone.blocks)
    expected = {}
    for i in range(depth // 2):
        expected[f"blocks.{i}.attn.qkv.difffit"] = ("gamma_qkv",)
        expected[f"blocks.{i}.attn.proj.difffit"] = ("gamma_branch", "gamma_proj")
        expected[f"blocks.{i}.mlp.fc2.difffit"] = ("gamma_branch",)
    assert pieces == expected
    trainable = set(model.trainable_names())
    assert "backbone.blocks.0.norm1.weight" in trainable and "backbone.blocks.0.attn.qkv.weight" not in trainable


def test_gamma_scales_the_layer_output_as_computed_by_hand():
    model = _difffit(tiny_dit())
    _perturb(model, std=0.3)
    block = model.backbone.model.transformer_blocks[0]
    x = torch.randn(2, 5, block.attn1.to_q.in_features)
    with torch.no_grad():
        out = block.attn1.to_out[0]
        g = out.difffit.gamma_branch * out.difffit.gamma_proj  # γ1 and out-proj γ act on the same channels
        torch.testing.assert_close(out(x), F.linear(x, out.weight, out.bias) * g, rtol=0, atol=1e-6)
        q = block.attn1.to_q
        torch.testing.assert_close(q(x), F.linear(x, q.weight, q.bias) * q.difffit.gamma_qkv, rtol=0, atol=1e-6)
        fc2 = block.ff.net[2]
        h = torch.randn(2, 5, fc2.in_features)
        torch.testing.assert_close(fc2(h), F.linear(h, fc2.weight, fc2.bias) * fc2.difffit.gamma_branch)
        norm = block.norm1.norm
        expected = F.layer_norm(x, x.shape[-1:], eps=norm.eps) * norm.difffit.weight + norm.difffit.bias
        torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-6)


def test_branch_gamma_scales_the_gated_attention_branch_before_the_skip():
    """x + γ1 ⊙ gate ⊙ Attn(·): the block's attention update is multiplied channel-wise by γ1."""
    backbone = tiny_dit(num_layers=1)
    model = _difffit(backbone, positions=("branch",), ln_affine=False)
    block = backbone.model.transformer_blocks[0]
    block.ff.net[2].difffit.enabled = False  # isolate the attention branch: the block output then is x + branch
    block.ff.net[2].weight.data.zero_(), block.ff.net[2].bias.data.zero_()
    x, t, y = torch.randn(2, 6, block.attn1.to_q.in_features), torch.tensor([5, 900]), torch.tensor([1, 2])
    gamma = torch.rand(block.attn1.to_out[0].out_features) + 0.5
    model.eval()
    with torch.no_grad():
        plain = block(x, timestep=t, class_labels=y) - x
        block.attn1.to_out[0].difffit.gamma_branch.copy_(gamma)
        scaled = block(x, timestep=t, class_labels=y) - x
    torch.testing.assert_close(scaled, plain * gamma, rtol=0, atol=1e-6)


# -- identity, merge, disabled(), training ----------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_identity_at_init(build):
    torch.manual_seed(0)
    reference = build().eval()
    inputs, _ = reference.example_batch(2, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = _difffit(build(), "sd" if build is tiny_unet else "paper").eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))


def test_merge_folds_gamma_and_the_layernorm_affines_into_the_adaln_modulation():
    model = _difffit(tiny_dit(num_layers=3), "paper")
    _perturb(model, std=0.2)
    model.eval()
    inputs, _ = _dit_batch(model.backbone, seed=3)
    with torch.no_grad():
        expected = model(inputs)
    modulation = model.backbone.model.transformer_blocks[1].norm1.linear
    before = modulation.weight.detach().clone()
    model.merge()
    d = modulation.out_features // 6
    changed = (modulation.weight != before).any(1).view(6, d).any(1).tolist()
    assert changed == [True, True, False, True, True, False]  # shift / scale rows, never the gates
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-4)
    model.unmerge()
    assert torch.equal(modulation.weight, before)
    plain = copy.deepcopy(model).merge_and_unload().model  # a plain diffusers DiT again, no pieces
    assert not any(isinstance(m, BranchScale | NormAffine) for m in plain.modules())
    with torch.no_grad():
        out = plain(inputs.x, timestep=inputs.timestep, class_labels=inputs.cond).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_layernorm_affine_fold_alone_is_exact_per_sample_timestep_and_class():
    model = _difffit(tiny_dit(), positions=(), biases=False, class_table=False)
    assert {type(m) for _, m in model.backbone.named_modules() if isinstance(m, BranchScale | NormAffine)} == {
        NormAffine
    }
    _perturb(model, std=0.5)
    model.eval()
    x = torch.randn(4, 4, 8, 8)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])  # 10: the CFG null class
    with torch.no_grad():
        expected = model.backbone.model(x, timestep=t, class_labels=y).sample
        model.merge()
        torch.testing.assert_close(model.backbone.model(x, timestep=t, class_labels=y).sample, expected, atol=1e-4,
                                   rtol=0)  # fmt: skip


def test_unet_merge_matches_within_1e_4():
    model = _difffit(tiny_unet(), "sd")
    _perturb(model, std=0.1)
    model.eval()
    inputs, _ = model.backbone.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs)
        model.merge()
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-4)


def test_an_added_affine_with_nothing_to_fold_into_refuses_to_merge():
    """A non-affine LayerNorm outside a DiT: the added affine trains, but merge refuses and changes nothing."""
    toy = lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 4))
    model = PeftModel(toy(), create_method("difffit", targets=("0",)))
    assert not model.method.can_merge(model.backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeable, match="folds only into a following adaLN modulation.*ln_affine=False"):
        model.merge()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = PeftModel(toy(), create_method("difffit", targets=("0",), ln_affine=False))
    assert plain.method.can_merge(plain.backbone)


def test_a_training_step_changes_only_the_declared_set_and_disabled_is_pristine():
    torch.manual_seed(0)
    pristine = tiny_dit().eval()
    torch.manual_seed(0)
    model = _difffit(tiny_dit(), "paper")
    declared = set(model.trainable_names())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_dit_batch(model.backbone, seed=s) for s in range(2)]
    fit_steps(model, batches, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
              model.backbone.example_loss)  # fmt: skip
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= declared
    table = "backbone.model.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    assert table in changed  # the one (tied) class table
    assert "backbone.model.transformer_blocks.0.norm1.linear.weight" not in declared  # "norm" in the name, not a norm
    inputs, _ = _dit_batch(model.backbone, seed=9)
    with torch.no_grad():
        reference = pristine(inputs)
        with model.disabled():
            assert torch.equal(model.backbone(inputs), reference)
        assert not torch.equal(model.eval()(inputs), reference)


def test_options_are_checked():
    with pytest.raises(ValueError, match="subset of"):
        create_method("difffit", positions=("branch", "ffn"))
    with pytest.raises(ValueError, match="first_half"):
        create_method("difffit", blocks="shallow")
    with pytest.raises(ValueError, match=r"blocks \[0, 14\) but DiffusersDiT has 2 blocks"):
        _difffit(tiny_dit(), blocks=(0, 14))
    with pytest.raises(NotSupported, match="no diffusers ResnetBlock2D"):
        _difffit(tiny_dit(), "sd")


# -- the DiT's tied embeddings and fresh class table -----------------------------------------------------------


def test_dit_xl2_tied_counts():
    untied = DiffusersDiT(config=DIT_XL_2, device="meta", tie_embeddings=False)
    tied = DiffusersDiT(config=DIT_XL_2, device="meta")
    per_block = sum(p.numel() for p in untied.model.transformer_blocks[0].norm1.emb.parameters())
    assert per_block == 1_624_320 + 1_153_152  # timestep MLP + class table
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(untied) == 749_826_464
    assert count(tied) == 749_826_464 - 27 * per_block == 674_834_720  # the original DiT-XL/2 layout
    tables = lambda m: [p for n, p in m.named_parameters() if n.endswith("embedding_table.weight")]
    assert sum(p.numel() for p in tables(untied)) == 32_288_256 and len(tables(tied)) == 1
    food = DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=FOOD101)
    assert [tuple(p.shape) for p in tables(food)] == [(102, D_XL)]
    assert food.model.config.num_embeds_ada_norm == FOOD101


def _equal_copies(backbone: DiffusersDiT) -> DiffusersDiT:
    """What a converted checkpoint looks like: every block's norm1.emb equal to block 0's."""
    state = backbone.model.transformer_blocks[0].norm1.emb.state_dict()
    for block in backbone.model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(state)
    return backbone


def test_tying_keeps_outputs_and_saves_every_copy(tmp_path):
    from diffusers import DiTTransformer2DModel

    untied = _equal_copies(DiffusersDiT(config=TINY_DIT, tie_embeddings=False, example_size=8))
    inputs, _ = _dit_batch(untied)
    with torch.no_grad():
        reference = untied(inputs)
    tied = DiffusersDiT(model=copy.deepcopy(untied.model), example_size=8)
    assert tied.tied and isinstance(tied.model.transformer_blocks[1].norm1.emb, TiedEmbedding)
    emb = sum(p.numel() for p in untied.model.transformer_blocks[0].norm1.emb.parameters())
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in untied.parameters()) - emb
    with torch.no_grad():
        assert torch.equal(tied(inputs), reference)
    tied.model.save_pretrained(tmp_path / "dit")  # safetensors refuses shared tensors: every copy is its own
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "dit")
    assert set(plain.state_dict()) == set(untied.model.state_dict())
    reloaded = DiffusersDiT(source=str(tmp_path / "dit"), example_size=8)
    with torch.no_grad():
        assert torch.equal(plain(inputs.x, timestep=inputs.timestep, class_labels=inputs.cond).sample, reference)
        assert reloaded.tied and torch.equal(reloaded(inputs), reference)
    assert not any(m.emit_copies for m in tied.model.modules() if isinstance(m, TiedEmbedding))


def test_loaded_copies_that_differ_stay_untied_with_a_warning():
    from diffusers import DiTTransformer2DModel

    raw = DiTTransformer2DModel.from_config(TINY_DIT)  # random: every block's copy differs
    with pytest.warns(UserWarning, match="differ from block 0's in blocks \\[1\\].*tie_embeddings=False"):
        backbone = DiffusersDiT(model=raw)
    assert not backbone.tied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not DiffusersDiT(model=DiTTransformer2DModel.from_config(TINY_DIT), tie_embeddings=False).tied


def test_untied_warnings_say_one_consistent_thing(tmp_path):
    """Issue 22 item 20: a DiT loaded with copies that differ is kept untied (tying would change it), and DiffFit
    on it warns about the extra tables without telling the user to tie it (the backbone just said it cannot);
    with tie_embeddings=False only DiffFit's warning is left. The shipped configs warn about neither
    (tests/test_latent_diffusion.py)."""
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel.from_config(TINY_DIT).save_pretrained(tmp_path / "dit")  # random: the copies differ
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _difffit(DiffusersDiT(source=str(tmp_path / "dit")), "paper")
    kept, trains = (str(w.message) for w in caught)
    assert "kept untied" in kept and "tie_embeddings=False to say the untied model is meant" in kept
    assert "2 separate class tables" in trains and "tying would then change the model" in trains
    assert not any("tie_embeddings=True" in m for m in (kept, trains))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _difffit(DiffusersDiT(source=str(tmp_path / "dit"), tie_embeddings=False), "paper")
    assert [str(w.message) for w in caught] == [trains]


def test_fresh_class_table_for_a_new_dataset(tmp_path):
    torch.manual_seed(0)
    backbone = DiffusersDiT(config=TINY_DIT, num_classes=3, example_size=8)
    labels = backbone.model.transformer_blocks[0].norm1.emb.class_embedder
    assert labels.embedding_table.weight.shape == (4, 16) and labels.num_classes == 3  # null label: 3
    assert not labels.embedding_table.weight.requires_grad
    assert 0.5 < labels.embedding_table.weight.std() < 2  # nn.Embedding's N(0, 1), as diffusers builds it
    inputs, _ = backbone.example_batch(8, torch.Generator().manual_seed(0))
    assert inputs.cond.max() < 3
    backbone.model.save_pretrained(tmp_path / "dit")
    again = DiffusersDiT(source=str(tmp_path / "dit"))
    assert again.model.config.num_embeds_ada_norm == 3
    assert torch.equal(again.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight,
                       labels.embedding_table.weight)  # fmt: skip
    untied = DiffusersDiT(config=TINY_DIT, num_classes=5, tie_embeddings=False)
    tables = [b.norm1.emb.class_embedder.embedding_table.weight for b in untied.model.transformer_blocks]
    assert tables[0].shape == (6, 16) and torch.equal(tables[0], tables[1]) and tables[0] is not tables[1]


FOOD_TABLE = 102 * D_XL  # 117,504: a fresh Food-101 table, 101 classes + the CFG null row
TABLE = "backbone.model.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"


@pytest.mark.parametrize(
    ("method", "without_table"),
    [
        ({"name": "lora", "r": 4}, 28 * 4 * 4 * (D_XL + D_XL)),  # 1,032,192: to_q, to_k, to_v, to_out.0 of 28 blocks
        ("svfit", 28 * 4 * D_XL),  # 129,024: the full spectrum of the same 112 square matrices
        ("bitfit", 489_632),  # the original DiT's biases
        ({"name": "difffit", "preset": "paper"}, 835_232 - FOOD_TABLE),
        ({"name": "difffit", "preset": "paper", "class_table": False}, 835_232 - FOOD_TABLE),
    ],
)
def test_a_fresh_dit_class_table_is_counted_under_every_method(method, without_table):
    """Issue 22 item 6: a fresh table (a new dataset's, `num_classes=K`) is the task's, like a classifier head:
    it trains under every method, not only DiffFit's (DiffFit's `class_table` decides the pretrained table only).
    BitFit with it is the paper's BitFit row, 607,136 ("0.61M")."""
    model = PeftModel(DiffusersDiT(config=DIT_XL_2, device="meta", num_classes=FOOD101), method)
    assert parameter_report(model).trainable == without_table + FOOD_TABLE
    assert TABLE in model.trainable_names() and TABLE.removeprefix("backbone.") in model.backbone.task_owned()
    pretrained = PeftModel(DiffusersDiT(config=DIT_XL_2, device="meta"), method)  # the ImageNet table: not the task's
    trains_table = isinstance(method, dict) and method["name"] == "difffit" and method.get("class_table", True)
    assert parameter_report(pretrained).trainable == without_table + trains_table * 1_001 * D_XL
    assert pretrained.backbone.task_owned() == []


@pytest.mark.parametrize("method", ["lora", "svfit", "bitfit", "difffit"])
def test_a_fresh_class_table_trains_round_trips_and_disabled_is_pristine(method, tmp_path):
    """The fresh table changes after a step under every method, is saved in the adapter file and loads back
    into a backbone built with the same num_classes (whose own random table it replaces); `disabled()` runs the
    table as built (its step-0 values)."""
    from mmpeft.core.state import adapter_from_file, save_adapter

    torch.manual_seed(0)
    pristine = DiffusersDiT(config=TINY_DIT, num_classes=3, example_size=8).eval()
    torch.manual_seed(0)
    model = PeftModel(DiffusersDiT(config=TINY_DIT, num_classes=3, example_size=8), method)
    table = model.get_parameter(TABLE)
    start = table.detach().clone()
    assert table.requires_grad
    batches = [_dit_batch(model.backbone, seed=s) for s in range(2)]
    assert all(int(inputs.cond.max()) < 3 for inputs, _ in batches)
    fit_steps(model, batches, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0),
              model.backbone.example_loss)  # fmt: skip
    assert not torch.equal(table, start)
    inputs, _ = _dit_batch(model.backbone, seed=9)
    with torch.no_grad(), model.disabled():
        assert torch.equal(model.backbone(inputs), pristine(inputs))
        assert torch.equal(model.get_parameter(TABLE), start)
    assert not torch.equal(table, start)  # the trained table is back after disabled()

    save_adapter(model, tmp_path / "adapter.safetensors")
    torch.manual_seed(0)  # the same frozen weights ...
    backbone = DiffusersDiT(config=TINY_DIT, num_classes=3, example_size=8)
    with torch.no_grad():  # ... with another random fresh table, which the file's replaces
        backbone.get_parameter(TABLE.removeprefix("backbone.")).normal_()
    again = adapter_from_file(backbone, tmp_path / "adapter.safetensors")
    assert torch.equal(again.get_parameter(TABLE), table)
    with torch.no_grad():
        assert torch.equal(again.eval()(inputs), model.eval()(inputs))
    assert set(again.trainable_state_dict()) == set(model.trainable_state_dict())


def test_tiny_unet_sd_preset_count():
    """The (32, 64) test UNet: BitFit's 10,596 (7,556 Linear / conv biases + 3,040 norm biases) + 3,040 norm
    weights + γ after attn1 / attn2 / ff of 6 blocks (1,152) + γ after the 12 ResNets' conv2 (608) = 15,396."""
    from mmpeft.backbones import create_backbone

    bitfit = parameter_report(PeftModel(create_backbone("tiny_sd_unet"), "bitfit")).trainable
    difffit = parameter_report(PeftModel(create_backbone("tiny_sd_unet"), {"name": "difffit", "preset": "sd"}))
    assert (bitfit, difffit.trainable) == (10_596, 10_596 + 3_040 + 1_152 + 608) == (10_596, 15_396)
