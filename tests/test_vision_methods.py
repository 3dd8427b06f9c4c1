"""VPT, SSF and MoSA: exact counts on ViT-B/16 (meta), structure, merges, masks (Jia et al. 2022, Lian et al.
2022, Zhang et al. 2023)."""

from __future__ import annotations

import pytest
import timm
import torch

from mmpeft.backbones import TimmViT
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.methods.mosa import MoSA, random_partition_masks, symmetric_kl
from mmpeft.methods.vpt import PromptInsertion

TINY = {"img_size": 32, "embed_dim": 32, "depth": 3, "num_heads": 2}


def vit_b16(method, **config):
    model = PeftModel(TimmViT("vit_base_patch16_224", device="meta"), create_method(method, **config), num_classes=0)
    return model, parameter_report(model)


# -- exact counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 10, 50, 100, 200])
def test_vpt_counts(p):
    assert vit_b16("vpt", length=p)[1].trainable == 768 * p
    assert vit_b16("vpt", length=p, deep=True)[1].trainable == 9_216 * p


def test_ssf_count_and_init_statistics():
    assert vit_b16("ssf")[1].trainable == 205_824
    torch.manual_seed(0)
    model = PeftModel(TimmViT("vit_base_patch16_224", **{**TINY, "embed_dim": 768, "num_heads": 12}), "ssf")
    gammas = torch.cat([m.gamma.detach() for m in model.backbone.modules() if hasattr(m, "gamma")])
    betas = torch.cat([m.beta.detach() for m in model.backbone.modules() if hasattr(m, "beta")])
    assert abs(gammas.mean() - 1) < 1e-3 and abs(gammas.std() - 0.02) < 1e-3
    assert abs(betas.mean()) < 1e-3 and abs(betas.std() - 0.02) < 1e-3


@pytest.mark.parametrize(("r", "deployable", "raw"), [(16, 322_752, 792_768), (64, 1_208_064, 3_005_184)])
def test_mosa_deployable_and_raw_counts(r, deployable, raw):
    model, report = vit_b16("mosa", bottleneck=r)
    assert report.trainable == raw
    assert model.method.deployable_count(model.backbone) == deployable


# -- VPT structure ------------------------------------------------------------------------------------


def tiny_vit(**kw):
    torch.manual_seed(0)
    return TimmViT("vit_base_patch16_224", **{**TINY, **kw})


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_sequence_layout_and_pooling(deep):
    model = PeftModel(tiny_vit(), create_method("vpt", length=5, deep=deep), num_classes=3).eval()
    lengths = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    tokens, ctx = model.backbone.forward_tokens(x)
    assert lengths == [1 + 4 + 5] * 3, "every block sees 1 + patches + p tokens"
    assert ctx.layout == {"cls": slice(0, 1), "prompts": slice(1, 6), "patches": slice(6, 10)}
    assert torch.equal(model.backbone.pool(tokens, ctx), model.backbone.fc_norm(tokens[:, 0]))


def test_vpt_deep_replaces_prompts_before_every_block():
    model = PeftModel(tiny_vit(), create_method("vpt", length=3, deep=True), num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        handle = model.backbone.blocks[0].register_forward_hook(
            lambda m, args, out: torch.cat([out[:, :1], out[:, 1:4] + 100.0, out[:, 4:]], dim=1)
        )
        assert torch.equal(model(x), reference), "block-0 outputs at prompt slots are discarded"
        handle.remove()
        with torch.no_grad():
            model.backbone.before_block[0][0].prompts.tokens[1].add_(1.0)  # the prompts of block 1
        assert not torch.equal(model(x), reference)


def test_vpt_init_bound_dropout_and_eval_policy():
    torch.manual_seed(0)
    model = PeftModel(TimmViT("vit_base_patch16_224"), create_method("vpt", length=200, deep=True, dropout=0.1))
    tokens = model.backbone.before_block[0][0].prompts.tokens.detach()
    assert tokens.abs().max() <= 0.0625 and abs(tokens.std().item() - 0.0625 / 3**0.5) < 1e-3
    model.train()
    assert not model.backbone.blocks[0].training and model.backbone.before_block[0][0].training
    insertion: PromptInsertion = model.backbone.before_block[1][0]
    small = PeftModel(tiny_vit(), create_method("vpt", length=4, dropout=0.5), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    small.eval()
    with torch.no_grad():
        assert torch.equal(small(x), small(x)), "no prompt dropout in eval"
        small.train()
        torch.manual_seed(1)
        a = small(x)
        torch.manual_seed(2)
        assert not torch.equal(a, small(x)), "prompt dropout is active in training"
    assert insertion.depth_index == 1


def test_vpt_paper_presets():
    deep = create_method("vpt", preset="paper")
    shallow = create_method("vpt", preset="paper_shallow")
    assert (deep.deep, deep.dropout, shallow.deep, shallow.dropout) == (True, 0.1, False, 0.0)


# -- SSF merge ------------------------------------------------------------------------------------------


def test_ssf_merged_state_dict_loads_into_plain_timm_with_equal_logits():
    backbone = tiny_vit(drop_path_rate=0.1)
    model = PeftModel(backbone, "ssf", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.merge_and_unload()
        state = model.backbone.state_dict()
        plain = timm.create_model("vit_base_patch16_224", num_classes=0, **TINY).eval()
        plain.load_state_dict(state, strict=True)
        assert not any("ssf" in k for k in state)
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)


def test_ssf_keeps_drop_path_active_in_training():
    model = PeftModel(tiny_vit(drop_path_rate=0.5), "ssf", num_classes=3).train()
    assert model.backbone.blocks[0].drop_path1.training


# -- MoSA -----------------------------------------------------------------------------------------------


def test_partition_masks_are_disjoint_and_complete():
    masks = random_partition_masks((16, 48), 4, torch.Generator().manual_seed(0))
    assert masks.shape == (4, 16, 48) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(16, 48, dtype=torch.long))
    assert set(masks.flatten(1).sum(1).tolist()) == {16 * 48 // 4}


def mosa_model(**config):
    torch.manual_seed(0)
    return PeftModel(tiny_vit(), MoSA(**{"bottleneck": 8, **config}), num_classes=3)


def test_mosa_experts_stay_inside_their_masks_through_training(tmp_path):
    model = mosa_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    model.train()
    for _ in range(4):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        outputs = [model(x) for _ in range(model.method.forward_passes)]
        loss = torch.nn.functional.cross_entropy(outputs[0], y) + model.method.extra_loss(outputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    moved = 0
    for adapter in MoSA.adapters(model.backbone):
        for i, w in enumerate(adapter.up.weights):
            assert torch.all(w[~adapter.up.masks[i]] == 0), "an expert changed outside its mask"
            moved += int(w.abs().sum() > 0)
    assert moved > 0


def test_mosa_eval_output_is_the_mean_over_forced_experts():
    model = mosa_model(dropout=0.0)
    with torch.no_grad():
        for adapter in MoSA.adapters(model.backbone):
            for i, w in enumerate(adapter.up.weights):
                w.copy_(torch.randn_like(w) * adapter.up.masks[i])
    adapter = MoSA.adapters(model.backbone)[0]
    m, x_in = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    from mmpeft.core.anatomy import ForwardContext

    adapter.eval()
    merged = adapter(m, ForwardContext(), x_in=x_in)
    forced = torch.stack([adapter(m, ForwardContext(), x_in=x_in, expert=i) for i in range(4)]).mean(0)
    torch.testing.assert_close(merged, forced, atol=1e-6, rtol=0)
    dense = adapter.dense_state()
    assert torch.allclose(dense["up.weight"], torch.stack(list(adapter.up.weights)).mean(0))


def test_mosa_identical_experts_make_train_equal_eval():
    model = mosa_model(dropout=0.0, consistency_weight=0.0)
    with torch.no_grad():
        for adapter in MoSA.adapters(model.backbone):
            shared = torch.randn_like(adapter.up.weights[0])
            for w in adapter.up.weights:
                w.copy_(shared)
    model.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.backbone(x)
        for adapter in MoSA.adapters(model.backbone):
            adapter.train()
        torch.testing.assert_close(model.backbone(x), evaluated, atol=1e-6, rtol=0)


def test_symmetric_kl_and_the_two_pass_switch():
    a = torch.randn(4, 10)
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert symmetric_kl(a, torch.randn(4, 10)).item() > 0
    assert MoSA().forward_passes == 2 and MoSA(consistency_weight=0).forward_passes == 1
    assert MoSA(consistency_weight=0).extra_loss([a, a]) is None


def test_mosa_presets_and_share_modes():
    cars = create_method("mosa", preset="paper_cars")
    assert (cars.bottleneck, cars.experts, cars.share) == (64, 2, "up")
    model = mosa_model(share="up", experts=2)
    adapter = MoSA.adapters(model.backbone)[0]
    assert len(adapter.down.weights) == 2 and not hasattr(adapter.up, "weights")
    with pytest.raises(ValueError, match="share must be one of"):
        MoSA(share="left")
