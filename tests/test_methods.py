"""Method specifics beyond the conformance suite: LoRA targets and merge, adapter inits, the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from mmpeft.backbones import TimmViT
from mmpeft.core.errors import NotSupported, UnknownName
from mmpeft.core.method import Method, create_method, get_method, register_method
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import Bottleneck, ScaleShift
from mmpeft.methods.lora import parse_target
from tests.toys import ToyRegViT

TINY = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_vit():
    return TimmViT("vit_base_patch16_224", **TINY)


def randomize(model: PeftModel) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)


@pytest.mark.parametrize(
    ("targets", "count"),
    [
        (("attn.qkv[q,v]",), 2 * 2 * 4 * (32 + 32)),
        (("attn.qkv[k]",), 2 * 4 * (32 + 32)),
        (("attn.qkv", "attn.proj"), 2 * 4 * ((32 + 96) + (32 + 32))),
        (("blocks.1.mlp.fc1",), 4 * (32 + 128)),
    ],
)
def test_lora_targets_counts_and_merge(targets, count):
    torch.manual_seed(0)
    model = PeftModel(tiny_vit(), create_method("lora", r=4, alpha=8, targets=targets), num_classes=3).eval()
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == count
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with model.disabled():
            frozen = model(x)
        assert not torch.allclose(before, frozen)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        model.merge()
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
        model.unmerge()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_lora_scale_is_alpha_over_r():
    torch.manual_seed(0)
    model = PeftModel(tiny_vit(), create_method("lora", r=4, alpha=8, targets=("attn.proj",)), num_classes=3)
    delta = model.backbone.blocks[0].attn.proj.lora.deltas["all"]
    assert delta.scale == 2.0
    randomize(model)
    x = torch.randn(5, 32)
    torch.testing.assert_close(delta(x), 2.0 * x @ delta.A.T @ delta.B.T)


def test_lora_bad_targets():
    with pytest.raises(ValueError, match="bad LoRA target"):
        parse_target("attn.qkv[x]")
    assert parse_target("attn.qkv[q, v]") == ("attn.qkv", ("q", "v"))
    with pytest.raises(NotSupported, match="LoRA supports nn.Linear and nn.Conv2d"):
        PeftModel(tiny_vit(), create_method("lora", targets=("norm1",)), num_classes=3)
    with pytest.raises(NotSupported, match=r"'attn.q_proj' matches no module.*close names: .*attn.proj"):
        PeftModel(tiny_vit(), create_method("lora", targets=("attn.q_proj",)), num_classes=3)
    with pytest.raises(NotSupported, match=r"'mlp.fc3' matches no module"):  # refused although attn.qkv matched
        PeftModel(tiny_vit(), create_method("lora", targets=("attn.qkv", "mlp.fc3")), num_classes=3)
    with pytest.raises(NotSupported, match="fused qkv"):
        PeftModel(tiny_vit(), create_method("lora", targets=("mlp.fc2[q]",)), num_classes=3)


def test_adapter_rejects_the_both_zero_init():
    with pytest.raises(ValueError, match="VPT's Adapter bug"):
        Bottleneck(8, 2, init="zeros")


def test_adapter_zero_up_init_trains_up_first_then_down():
    """With up = 0 the down projection's gradient is exactly zero at step 0 (it flows through W_up); the
    up projection's is not, so after one step up is non-zero and the down projection trains too."""
    torch.manual_seed(0)
    model = PeftModel(ToyRegViT(), "adapter", num_classes=3).train()
    adapter = model.backbone.blocks[0].site("mlp.parallel")[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0, "zero-up init still trains the up projection"
    assert torch.count_nonzero(adapter.down.weight.grad) == 0, "nothing reaches down through W_up = 0 yet"
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    assert adapter.down.weight.grad.abs().sum() > 0, "after one step the down projection trains"


@pytest.mark.parametrize("position", ["parallel", "sequential"])
def test_adapter_position_site_and_drop_path(position):
    """Parallel (AdaptFormer): on `mlp.parallel`, after LayerScale and drop-path, reading the block's
    stream; sequential (Pfeiffer): on `mlp.branch`, reading the MLP output, dropped with it."""
    from mmpeft.core.anatomy import ForwardContext

    torch.manual_seed(0)
    model = PeftModel(ToyRegViT(), create_method("adapter", position=position, dropout=0.0), num_classes=3)
    block = model.backbone.blocks[0]
    site = "mlp.parallel" if position == "parallel" else "mlp.branch"
    assert len(block.site(site)) == 1 and sum(len(s) for _, s in block.named_sites()) == 1
    adapter = block.site(site)[0]
    randomize(model)
    block.drop_path2.drop_prob = 1.0  # training drops the whole MLP branch
    block.train()
    x = torch.randn(2, 7, 32)  # tokens straight into the block
    torch.manual_seed(1)
    out = block(x, ForwardContext())
    adapter.enabled = False
    torch.manual_seed(1)
    plain = block(x, ForwardContext())
    if position == "parallel":  # the adapter's term survives the dropped branch
        assert not torch.allclose(out, plain)
    else:
        assert torch.equal(out, plain), "a sequential adapter on the MLP output is dropped with it"
    assert adapter.parallel == (position == "parallel")


def test_adapter_paper_preset():
    paper = get_method("adapter").preset("paper")
    assert (paper.bottleneck, paper.scale, paper.dropout, paper.activation) == (64, 0.1, 0.1, "relu")
    with pytest.raises(ValueError, match="parallel' or 'sequential"):
        create_method("adapter", position="diagonal")


def test_scale_shift_folds_into_linear_conv_and_norm():
    torch.manual_seed(0)
    for layer, x in (
        (torch.nn.Linear(6, 4), torch.randn(3, 6)),
        (torch.nn.Conv2d(2, 4, 3), torch.randn(1, 2, 5, 5)),
        (torch.nn.LayerNorm(4), torch.randn(3, 4)),
    ):
        ss = ScaleShift(4, init="normal", channel_dim=1 if isinstance(layer, torch.nn.Conv2d) else -1)
        expected = ss(layer(x))
        with torch.no_grad():
            for key, value in ss.merge_updates(layer).items():
                getattr(layer, key).copy_(value)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    ss = ScaleShift(10_000, init="normal")
    assert abs(ss.gamma.mean().item() - 1) < 2e-3 and abs(ss.gamma.std().item() - 0.02) < 2e-3


def test_registry_errors_are_clear():
    with pytest.raises(UnknownName, match=r"unknown method 'lroa'; did you mean lora\?.*Registered methods"):
        create_method("lroa")
    with pytest.raises(UnknownName, match=r"has no option\(s\) \['rank'\]"):
        create_method("lora", rank=4)
    with pytest.raises(UnknownName, match="no preset 'noah'"):
        create_method("lora", preset="noah")
    with pytest.raises(UnknownName, match="unknown method 'ssff'"):
        PeftModel(tiny_vit(), "ssff", num_classes=2)


def test_registering_a_third_party_method_and_name_clashes():
    @register_method
    @dataclass
    class NormTune(Method):
        """Trains LayerNorm affines only (LN-tuning)."""

        name: ClassVar[str] = "test_ln_tune"
        mergeable: ClassVar[bool] = True

        def unfrozen(self, backbone):
            return [n for n, _ in backbone.named_parameters() if ".norm" in n or n.startswith("norm")]

    model = PeftModel(TimmViT("vit_base_patch16_224", device="meta"), "test_ln_tune", num_classes=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 38_400  # spec: LN-tune
    with pytest.raises(ValueError, match="is taken"):

        @register_method
        @dataclass
        class Other(Method):
            name: ClassVar[str] = "lora"

    from mmpeft.core.method import METHODS

    METHODS.pop("test_ln_tune")


def test_a_method_cannot_be_applied_twice():
    backbone = tiny_vit()
    PeftModel(backbone, "lora", num_classes=2)
    with pytest.raises(RuntimeError, match="already has method 'lora'"):
        PeftModel(backbone, "bitfit", num_classes=2)
