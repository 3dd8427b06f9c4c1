"""Core II beyond the conformance matrix: the forward context on every backbone (and through
checkpoint recomputes), replace attachments, piece state kinds, the safe merge, token-group removal,
the new sites, loud targets, conv LoRA and low-precision hosts."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.backbones import TimmViT
from mmpeft.core.anatomy import TokenBackbone
from mmpeft.core.context import BackboneInput, ForwardContext
from mmpeft.core.errors import NotMergeable, NotSupported
from mmpeft.core.inject import attach, find_modules
from mmpeft.core.method import METHODS, Method, create_method, register_method
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import AdapterModule, LowRank
from mmpeft.core.state import adapter_from_file, read_adapter, save_adapter
from tests.conftest import tiny_dit, tiny_unet
from tests.toys import ToyRegViT, ToyTextTower

# -- toy methods that read the context -----------------------------------------------------------------


class StepScale(AdapterModule):
    """Scales its host's output by 1 + w * step, reading the step from the backbone's context."""

    def __init__(self, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.full((width,), 0.5))
        self.seen: list[ForwardContext] = []

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        assert ctx is not None, "a name-targeted piece sees its backbone's context"
        self.seen.append(ctx)
        step = 0.0 if ctx.step is None else float(ctx.step)
        shape = (-1,) + (1,) * (y.dim() - 2) if y.dim() == 4 else (-1,)
        return y * (1 + self.w.view(shape) * step)


@dataclass
class ToyStepMethod(Method):
    name: ClassVar[str] = "test_step_scale"
    mergeable: ClassVar[bool] = False
    targets: tuple[str, ...] = ("to_out.0", "attn.proj")

    def inject(self, backbone: nn.Module) -> None:
        for _, module in find_modules(backbone, list(self.targets), required=False):
            attach(module, "step_scale", StepScale(module.out_features))


def denoiser_input(backbone, seed: int = 0, step: int | None = None) -> tuple[BackboneInput, torch.Tensor]:
    x, target = backbone.example_batch(2, torch.Generator().manual_seed(seed))
    x.step = step
    return x, target


BACKBONES = {"unet": tiny_unet, "dit": tiny_dit}


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_name_targeted_pieces_read_timestep_cond_and_step(kind):
    model = PeftModel(BACKBONES[kind](), "test_step_scale").eval()
    x, _ = denoiser_input(model.backbone)
    with torch.no_grad():
        outs = {s: model(BackboneInput(x.x, x.timestep, x.cond, step=s)) for s in (None, 1, 5)}
    assert not torch.allclose(outs[1], outs[5])
    pieces = [m for m in model.modules() if isinstance(m, StepScale)]
    ctx = pieces[0].seen[-1]
    assert ctx.step == 5 and ctx.timestep is x.timestep and ctx.cond is x.cond
    assert all(p.seen[-1] is ctx for p in pieces), "one context per forward, seen by every piece"
    assert model.backbone.context is None, "no context outside a forward"


def _grads(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_forwards_one_backward(build, checkpointing: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = PeftModel(build(), "test_step_scale").train()
    if checkpointing == "mmpeft":
        model.backbone.set_grad_checkpointing(True)
    elif checkpointing == "diffusers":  # the user turns diffusers' own checkpointing on, bypassing mmpeft
        model.backbone.model.enable_gradient_checkpointing()
    loss = 0
    for step, seed in ((1, 0), (7, 1)):  # two forwards (two steps of a schedule), then one backward
        x, target = denoiser_input(model.backbone, seed, step)
        loss = loss + model.backbone.example_loss(model(x), target)
    loss.backward()
    return _grads(model)


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("checkpointing", ["mmpeft", "diffusers"])
def test_checkpoint_recompute_sees_the_forward_s_own_context(kind, checkpointing):
    plain = _two_forwards_one_backward(BACKBONES[kind], "none")
    recomputed = _two_forwards_one_backward(BACKBONES[kind], checkpointing)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_token_backbone_checkpointing_two_forwards_and_steps():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = PeftModel(TimmViT("test_vit", img_size=32), "test_step_scale", num_classes=3).train()
        model.backbone.set_grad_checkpointing(ckpt)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        loss = sum(model(BackboneInput(x, step=s)).square().mean() for s in (2, 9))
        loss.backward()
        grads.append(_grads(model))
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def _lora_model(seed: int) -> PeftModel:
    torch.manual_seed(seed)
    model = PeftModel(tiny_unet(), "lora").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.1)
    return model


def test_two_models_in_one_process_keep_their_own_context():
    inputs = [denoiser_input(tiny_unet(), seed, step)[0] for seed, step in ((0, 2), (1, 6), (2, 4))]
    alone_a, alone_b = _lora_model(1), PeftModel(tiny_unet(), "test_step_scale").eval()
    with torch.no_grad():
        expected_a = [alone_a(x) for x in inputs]
        expected_b = [alone_b(x) for x in inputs]
        a, b = _lora_model(1), PeftModel(tiny_unet(), "test_step_scale").eval()
        for i, x in enumerate(inputs):  # alternately
            assert torch.equal(a(x), expected_a[i])
            assert torch.equal(b(x), expected_b[i])
    assert a.backbone.context_slot is not b.backbone.context_slot
    clone = copy.deepcopy(b)
    assert clone.backbone.context_slot is not b.backbone.context_slot
    piece = next(m for m in clone.modules() if isinstance(m, StepScale))
    assert piece.context_slot is clone.backbone.context_slot, "a copy's pieces follow the copy's slot"


# -- replace attachments and piece state kinds -----------------------------------------------------------


class DoubledWeight(AdapterModule):
    """Replaces a Linear's computation with `x (2W)^T + b` (as QALoRA replaces W with Q(W + BA))."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, host: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, 2 * host.weight, host.bias)


class Stateful(AdapterModule):
    """One trainable tensor, one persistent state tensor (saved), one derived tensor (rebuilt, never saved)."""

    def __init__(self, host: nn.Linear):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(host.out_features))
        self.register_state("seen_batches", torch.zeros((), dtype=torch.long))
        self.register_derived("row_norms", host.weight.detach().norm(dim=1))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen_batches += 1
        return y * self.scale + 0 * self.row_norms


@dataclass
class ToyReplaceMethod(Method):
    name: ClassVar[str] = "test_replace"

    def inject(self, backbone: nn.Module) -> None:
        for _, module in find_modules(backbone, ["attn.proj"]):
            attach(module, "doubled", DoubledWeight(), where="replace")
        for _, module in find_modules(backbone, ["mlp.fc2"]):
            attach(module, "stateful", Stateful(module))


def test_replace_attachment_keeps_keys_and_runs_the_original_when_disabled():
    torch.manual_seed(0)
    plain = TimmViT("test_vit", img_size=32).eval()
    keys = set(plain.state_dict())
    torch.manual_seed(0)
    model = PeftModel(TimmViT("test_vit", img_size=32), "test_replace", num_classes=3).eval()
    own = {k for k in model.backbone.state_dict() if ".doubled." not in k and ".stateful." not in k}
    assert own == keys, "every frozen tensor keeps its key"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted, reference = model.backbone(x), plain(x)
        assert not torch.allclose(adapted, reference)
        with model.disabled():
            assert torch.equal(model.backbone(x), reference), "a replaced layer runs its own forward when disabled"
        assert torch.equal(copy.deepcopy(model).backbone(x), adapted)
    proj = model.backbone.blocks[0].attn.proj
    assert proj.doubled.calls > 0
    model.unload()
    assert "forward" not in proj.__dict__ and not hasattr(proj, "doubled")
    with torch.no_grad():
        assert torch.equal(model.backbone(x), reference)


def test_adapter_file_holds_trainable_and_state_but_not_derived(tmp_path):
    torch.manual_seed(0)
    model = PeftModel(TimmViT("test_vit", img_size=32), "test_replace", num_classes=3).train()
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        model.backbone.blocks[0].mlp.fc2.stateful.scale.mul_(1.5)
    save_adapter(model, tmp_path / "a.safetensors")
    tensors, _ = read_adapter(tmp_path / "a.safetensors")
    assert "backbone.blocks.0.mlp.fc2.stateful.scale" in tensors
    assert int(tensors["backbone.blocks.0.mlp.fc2.stateful.seen_batches"]) == 3
    assert not any("row_norms" in k for k in tensors), "derived tensors are rebuilt, never stored"
    torch.manual_seed(0)
    restored = adapter_from_file(TimmViT("test_vit", img_size=32), tmp_path / "a.safetensors")
    piece = restored.backbone.blocks[0].mlp.fc2.stateful
    assert int(piece.seen_batches) == 3 and torch.equal(piece.scale, model.backbone.blocks[0].mlp.fc2.stateful.scale)
    torch.testing.assert_close(piece.row_norms, model.backbone.blocks[0].mlp.fc2.weight.norm(dim=1))


# -- merge ----------------------------------------------------------------------------------------------


def test_merge_refuses_non_finite_values_and_changes_nothing():
    model = _lora_model(0)
    with torch.no_grad():
        model.backbone.model.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora.deltas["all"].B[0, 0] = (
            float("inf")
        )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeable, match=r"non-finite values into .*up_blocks\.0\..*to_q\.weight; nothing was"):
        model.merge()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if v.isfinite().all())
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterModule))


def test_disabled_refuses_a_merged_model_and_unload_unmerges():
    model = _lora_model(0)
    x, _ = denoiser_input(model.backbone)
    torch.manual_seed(0)
    pristine = tiny_unet().eval()
    model.merge()
    with pytest.raises(NotSupported, match="call unmerge"):
        with model.disabled():
            pass
    backbone = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), pristine(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["*resnets.*.conv2", "conv_in"])
def test_conv_lora_counts_and_merges_exactly(target, tmp_path):
    r = 4
    torch.manual_seed(0)
    model = PeftModel(tiny_unet(), create_method("lora", r=r, targets=(target,))).eval()
    convs = [m for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d) and hasattr(m, "lora")]
    assert convs
    expected = sum(r * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels) for c in convs)
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == expected
    with torch.no_grad():
        for c in convs:
            c.lora.deltas["all"].B.normal_(0, 0.1)
    x, _ = denoiser_input(model.backbone)
    save_adapter(model, tmp_path / "conv.safetensors")
    with torch.no_grad():
        before = model(x)
        torch.manual_seed(0)
        fresh = tiny_unet()  # the same random backbone; the file brings the LoRA
        assert torch.equal(adapter_from_file(fresh, tmp_path / "conv.safetensors").eval()(x), before)
        model.merge()
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)


def test_low_rank_conv_delta_is_the_composed_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    delta = LowRank.for_layer(conv, 3, alpha=6.0)
    nn.init.normal_(delta.B)
    x = torch.randn(2, 6, 9, 9)
    composed = F.conv2d(x, delta.delta_weight(), None, conv.stride, conv.padding)
    torch.testing.assert_close(delta(x), composed, atol=1e-5, rtol=1e-5)
    assert delta.scale == 2.0
    with pytest.raises(NotSupported, match="ungrouped"):
        LowRank.for_layer(nn.Conv2d(4, 4, 3, groups=2), 2)


# -- targets --------------------------------------------------------------------------------------------


def test_a_pattern_that_matches_nothing_is_refused_even_beside_one_that_matches():
    with pytest.raises(NotSupported, match=r"'to_qq' matches no module.*close names: .*to_q"):
        PeftModel(tiny_unet(), create_method("lora", targets=("to_q", "to_qq")))
    with pytest.raises(NotSupported, match=r"'*resnets.*.conv3' matches no module"):
        PeftModel(tiny_unet(), create_method("ssf", targets=("*resnets.*.conv3",)))
    with pytest.raises(NotSupported, match=r"BitFit target pattern '\*ff\.net\.9\*' matches no bias"):
        PeftModel(tiny_unet(), create_method("bitfit", targets=("*ff.net.9*",)))
    model = PeftModel(tiny_unet(), create_method("bitfit", targets=("*attn1*",)))
    trained = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trained and all("attn1" in n and n.endswith("bias") for n in trained)


def test_lora_target_globs_and_fused_parts():
    lora = create_method("lora", targets=("blocks.[0-1].mlp.fc1",))
    model = PeftModel(TimmViT("test_vit", img_size=32, depth=4), lora)
    hosts = sorted(n for n, m in model.backbone.named_modules() if hasattr(m, "lora") and isinstance(m, nn.Linear))
    assert hosts == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    with pytest.raises(ValueError, match="bad LoRA target"):
        create_method("lora", targets=("attn.qkv[q,x]",)).apply(TimmViT("test_vit", img_size=32))


def test_denoiser_lora_defaults_follow_diffusers_dreambooth():
    unet = PeftModel(tiny_unet(), "lora")
    hosts = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
             for n, m in unet.backbone.named_modules() if hasattr(m, "lora")}  # fmt: skip
    assert hosts == {"to_q", "to_k", "to_v", "to_out.0"}


# -- token groups, metadata and sites -------------------------------------------------------------------


def test_insert_and_remove_keep_every_per_token_record_consistent():
    b, n, d = 2, 5, 4
    ctx = ForwardContext(layout={"cls": slice(0, 1), "patches": slice(1, n)})
    ctx.positions = torch.arange(n, dtype=torch.float).view(1, n, 1).expand(b, n, d).clone()
    ctx.token_meta["centres"] = torch.arange(n, dtype=torch.float).view(1, n, 1).expand(b, n, 3).clone()
    ctx.attn_mask = torch.eye(n, dtype=torch.bool)
    ctx.pool_index = torch.tensor([4, 2])
    ctx.prompt_index = 1
    x = torch.randn(b, n, d)
    centre_rows = torch.full((b, 2, 3), -1.0)
    y = ctx.insert(x, torch.zeros(b, 2, d), "prompts", at=1, meta={"centres": centre_rows})
    assert ctx.layout == {"cls": slice(0, 1), "prompts": slice(1, 3), "patches": slice(3, 7)}
    assert ctx.token_meta["centres"][0, :, 0].tolist() == [0, -1, -1, 1, 2, 3, 4]
    assert ctx.positions[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert ctx.attn_mask.shape == (7, 7) and ctx.pool_index.tolist() == [6, 4]
    z = ctx.remove(y, "prompts")
    assert torch.equal(z, x)
    assert ctx.layout == {"cls": slice(0, 1), "patches": slice(1, 5)}
    assert ctx.token_meta["centres"][0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ctx.attn_mask, torch.eye(n, dtype=torch.bool)) and ctx.pool_index.tolist() == [4, 2]
    with pytest.raises(ValueError, match="pooled token"):
        ctx.remove(z, "patches")


class InsertPrompts(AdapterModule):
    def __init__(self, dim: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(1, 3, dim) * 0.1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        return ctx.insert(x, self.prompts.expand(x.shape[0], -1, -1), "prompts", ctx.prompt_index)


class RemovePrompts(AdapterModule):
    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        return ctx.remove(x, "prompts")


class ReadsPrompts(AdapterModule):
    """Inside block 0: needs the prompt group, which block 1's hook removes later in the same forward."""

    def forward(self, h: torch.Tensor, ctx: ForwardContext, **extra) -> torch.Tensor:
        s = ctx.span("prompts")
        return h + 0 * h[:, s].sum()


@dataclass
class ToyShortPrompts(Method):
    """Prompts for block 0 only, removed before block 1 (Point-PEFT style)."""

    name: ClassVar[str] = "test_short_prompts"
    needs_tokens: ClassVar[bool] = True

    def inject(self, backbone: nn.Module) -> None:
        assert isinstance(backbone, TokenBackbone)
        backbone.before_block[0].append(InsertPrompts(backbone.embed_dim))
        backbone.blocks[0].site("attn.in").append(ReadsPrompts())
        backbone.before_block[1].append(RemovePrompts())


def test_removed_prompts_under_checkpointing_recompute_with_the_layout_they_had():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = PeftModel(ToyTextTower(), "test_short_prompts", num_classes=3).train()
        model.backbone.set_grad_checkpointing(ckpt)
        ids = model.backbone.example_inputs(2, torch.Generator().manual_seed(0))
        tokens, ctx = model.backbone.forward_tokens(ids)
        assert tokens.shape[1] == ids.shape[1] and "prompts" not in ctx.layout
        model(ids).sum().backward()
        grads.append(_grads(model))
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


class AddOne(AdapterModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = self.branch = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext, x_in: torch.Tensor | None = None,
                branch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        self.seen, self.branch = x_in, branch
        return x + self.w * (x_in if x_in is not None else 1.0)


def test_parallel_site_sits_after_layer_scale_and_drop_path_and_block_out_after_the_block():
    torch.manual_seed(0)
    vit = ToyRegViT().train()  # LayerScale 0.5 and drop-path 0.1 in every block
    block = vit.blocks[0]
    block.drop_path2.drop_prob = 1.0  # the MLP branch is always dropped in training
    x = torch.randn(2, 7, 32)
    ctx = ForwardContext()
    torch.manual_seed(1)
    plain = block(x, ctx)
    piece = AddOne()
    block.site("mlp.parallel").append(piece)
    torch.manual_seed(1)
    parallel = block(x, ctx)
    assert torch.equal(piece.seen, plain), "x_in is the stream after attention (the MLP branch was dropped)"
    assert torch.equal(piece.branch, torch.zeros_like(plain)), "branch: what the block added there (dropped: zero)"
    torch.testing.assert_close(parallel, 2 * plain)  # the adapter's f(x_in) is neither scaled by LayerScale nor dropped
    block.site("mlp.parallel").pop(0)
    out = AddOne()
    block.site("block.out").append(out)
    torch.manual_seed(1)
    torch.testing.assert_close(block(x, ctx), plain + 1.0)
    assert {name for name, _ in block.named_sites()} >= {"attn.parallel", "mlp.parallel", "block.out"}


@pytest.fixture(autouse=True, scope="module")
def _toy_methods():
    """The toy methods are registered for this module only (the conformance matrix must not see them)."""
    toys = (ToyStepMethod, ToyReplaceMethod, ToyShortPrompts)
    for cls in toys:
        register_method(cls)
    yield
    for cls in toys:
        METHODS.pop(cls.name)


# -- low-precision hosts --------------------------------------------------------------------------------


def test_pieces_stay_fp32_on_a_bf16_backbone_and_merge_back_to_bf16():
    torch.manual_seed(0)
    model = PeftModel(TimmViT("test_vit", img_size=32).to(torch.bfloat16), "lora", num_classes=3)
    model.head.to(torch.bfloat16)
    deltas = [m for m in model.modules() if isinstance(m, LowRank)]
    assert deltas and all(d.A.dtype == torch.float32 and d.B.dtype == torch.float32 for d in deltas)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(d.A.grad is None or d.A.grad.dtype == torch.float32 for d in deltas)
    model.merge()
    assert model.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    ssf = PeftModel(TimmViT("test_vit", img_size=32).to(torch.bfloat16), "ssf", num_classes=3)
    assert ssf.backbone.blocks[0].norm1.ssf.gamma.dtype == torch.float32
    assert ssf.backbone(x).dtype == torch.bfloat16
    same = PeftModel(TimmViT("test_vit", img_size=32).to(torch.bfloat16), create_method("lora", param_dtype="backbone"))
    assert next(m for m in same.modules() if isinstance(m, LowRank)).A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        PeftModel(TimmViT("test_vit", img_size=32), create_method("lora", param_dtype="fp8"))


def test_a_refused_method_leaves_the_backbone_as_it_found_it():
    """LoRA refuses a LayerNorm target after it has attached to the linears before it: nothing stays."""
    backbone = TimmViT("test_vit", img_size=32)
    keys = set(backbone.state_dict())
    with pytest.raises(NotSupported, match="LoRA supports nn.Linear and nn.Conv2d"):
        PeftModel(backbone, create_method("lora", targets=("attn.qkv", "norm1")))
    assert set(backbone.state_dict()) == keys and all(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, AdapterModule) for m in backbone.modules())
    model = PeftModel(backbone, "lora")  # and it can still take a method
    assert sum(p.requires_grad for p in model.backbone.parameters()) > 0


class SiteScale(AdapterModule):
    """A per-channel scale on a block's `mlp.out` site that folds into `mlp.fc2` (a site piece that merges)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, m: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return m * self.gamma

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        fc2 = host.mlp.fc2
        return {"mlp.fc2.weight": fc2.weight * self.gamma[:, None], "mlp.fc2.bias": fc2.bias * self.gamma}


@dataclass
class ToySiteScale(Method):
    name: ClassVar[str] = "test_site_scale"
    mergeable: ClassVar[bool] = True
    needs_tokens: ClassVar[bool] = True

    def inject(self, backbone: nn.Module) -> None:
        for _, site in backbone.sites("mlp.out"):
            site.append(SiteScale(backbone.embed_dim))


def test_site_pieces_merge_through_the_same_path_as_hooks():
    torch.manual_seed(0)
    model = PeftModel(TimmViT("test_vit", img_size=32), ToySiteScale(), num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        model.merge()
        assert not torch.equal(model.backbone.blocks[0].mlp.fc2.weight, weights["backbone.blocks.0.mlp.fc2.weight"])
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
        model.unmerge()  # no unmerge_updates: the core restores the pre-merge values it kept
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
        plain = model.merge_and_unload()
    assert not any(len(site) for _, block in enumerate(plain.blocks) for _, site in block.named_sites())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
