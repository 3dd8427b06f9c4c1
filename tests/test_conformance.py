"""The conformance suite: every registered method on every backbone it supports.

Each check is one test over the (method, backbone) matrix; later issues add methods and backbones
to the matrix and inherit every check. A method that does not support a backbone must say so by
raising `NotSupported` when applied; that pair is then checked for exactly that.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mmpeft.core.anatomy import TokenBackbone
from mmpeft.core.errors import AdapterMismatch, NotMergeable, NotSupported
from mmpeft.core.method import get_method, list_methods, task_owned
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules
from mmpeft.core.state import load_adapter, save_adapter
from mmpeft.tasks.step import fit_steps
from tests.conftest import BackboneCase, backbone_cases
from tests.method_counts import expected_count, prepare_for_tests, task_owned_count

CASES = {c.name: c for c in backbone_cases()}
NUM_CLASSES = 5
BATCH = 4


def _supported(method: str, case: BackboneCase) -> bool:
    try:
        backbone = case.build()
        PeftModel(backbone, method, num_classes=NUM_CLASSES if backbone.num_features else None)
    except NotSupported:
        return False
    return True


def _is_token(case: str) -> bool:
    return isinstance(CASES[case].build(), TokenBackbone)


MATRIX = [(m, c) for m in list_methods() for c in CASES]
SUPPORTED = [pytest.param(m, c, id=f"{m}-{c}") for m, c in MATRIX if _supported(m, CASES[c])]
UNSUPPORTED = [pytest.param(m, c, id=f"{m}-{c}") for m, c in MATRIX if not _supported(m, CASES[c])]


def has_head(case: str) -> bool:
    return bool(CASE_FEATURES[case])


def build(method: str, case: str, seed: int = 0, other: bool = False) -> PeftModel:
    torch.manual_seed(seed)
    c = CASES[case]
    backbone = (c.build_other if other else c.build)()
    torch.manual_seed(seed + 1000)  # method init independent of the backbone's draws
    model = PeftModel(backbone, method, num_classes=NUM_CLASSES if backbone.num_features else None)
    prepare_for_tests(method)(model)
    return model


def inputs(model: PeftModel, seed: int = 0):
    """The backbone's own example batch: (inputs, targets)."""
    g = torch.Generator().manual_seed(seed)
    return model.backbone.example_batch(BATCH, g, NUM_CLASSES if model.backbone.num_features else None)


def train_steps(model: PeftModel, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps (the shared training step) with weight decay over *all* parameters, as a careless
    user would."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    fit_steps(model, [inputs(model, seed=step) for step in range(steps)], opt, model.backbone.example_loss)


def eval_logits(model: PeftModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs(model, seed=99)[0])


def features(model: PeftModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.backbone(inputs(model, seed=99)[0])


def pristine_features(case: str, model: PeftModel) -> torch.Tensor:
    """The untouched backbone (same seed) on the same inputs."""
    torch.manual_seed(0)
    pristine = CASES[case].build().eval()
    with torch.no_grad():
        return pristine(inputs(model, seed=99)[0])


CASE_FEATURES = {name: CASES[name].build().num_features for name in CASES}


# -- declared set -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_exactly_the_declared_set_trains(method, case):
    model = build(method, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_names())
    added = {f"backbone.{prefix}.{n}" for prefix, m in adapter_modules(model.backbone) for n, _ in m.named_parameters()}
    assert added <= trainable, "every method-owned parameter is in the declared set"
    assert any(n.startswith("head.") for n in trainable) == has_head(case)  # a linear or an MLP-BN head
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert backbone_trainable == expected_backbone_trainable(method, model)


def expected_backbone_trainable(method: str, model: PeftModel) -> int:
    """Counts from the backbone's module shapes, independently of how the methods declare them: each method's
    own `tests/method_counts/<method>.py`."""
    return expected_count(method)(model) + task_owned_count(model.backbone)


def test_every_method_runs_on_every_token_backbone():
    """Every token backbone, or, for a method that reads point geometry (`needs_points`), the point backbone it is
    made for (a point transformer; Any2Point's)."""
    specialised = lambda m: get_method(m).needs_points or get_method(m).needs_denoiser
    assert not [p.id for p in UNSUPPORTED if _is_token(p.values[1]) and not specialised(p.values[0])]
    points = [m for m in list_methods() if specialised(m)]
    homes = {"point_peft": ["point_mae"], "any2point": ["any2point_2d", "any2point_text"],
             "efficientdm": ["sd_unet", "dit"]}  # fmt: skip
    assert sorted(points) == sorted(homes)
    assert all((m, case) in [tuple(p.values) for p in SUPPORTED] for m in points for case in homes[m])


def test_ssf_bitfit_and_full_defaults_apply_on_every_backbone():
    """Their defaults fit each family (no refusal for a missing patch_embed, a UNet, a convnet)."""
    assert not [p.id for p in UNSUPPORTED if p.values[0] in ("ssf", "bitfit", "full")]
    assert {c for m, c in [p.values for p in SUPPORTED] if m == "lora"} >= {"sd_unet", "dit", "timm_vit"}


@pytest.mark.parametrize(("method", "case"), UNSUPPORTED)
def test_unsupported_pairs_raise_not_supported(method, case):
    declared = get_method(method)
    expected = (
        "diffusion denoiser"
        if declared.needs_denoiser
        else "TokenBackbone|point transformer|any2point backbone"
        if declared.needs_points
        else "TokenBackbone"
        if declared.needs_tokens
        else "no default targets for 'timm'|no pooled features"
    )
    with pytest.raises(NotSupported, match=expected):
        build(method, case)


# -- frozen means frozen ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_frozen_tensors_and_bn_statistics_bit_identical_after_steps(method, case):
    model = build(method, case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names())
    train_steps(model)
    after = model.state_dict()
    trained_bn_buffers = {  # BatchNorms that train whole (the MLP-BN head's, a method's own, all under full)
        f"{n}.{b}"
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and all(p.requires_grad for p in m.parameters(recurse=False))
        for b, _ in m.named_buffers(recurse=False)
    }
    for key, value in before.items():
        if key in trainable or key in trained_bn_buffers:
            continue  # ... keep statistics; every frozen BatchNorm's stay bit-identical
        assert torch.equal(value, after[key]), f"frozen tensor {key} changed"
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
    changed = [k for k in trainable if not torch.equal(before[k], after[k])]
    assert changed, "training changed nothing"
    if method != "linear":
        assert any(not k.startswith("head.") for k in changed), "only the head moved"
    else:
        assert not has_head(case) or changed


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_frozen_mode_policy_survives_train_eval_switches(method, case):
    model = build(method, case)
    model.train()
    model.eval()
    model.train()
    policy = model.method.frozen_mode
    owned = set(task_owned(model.backbone))  # tensors the backbone trains for its task, whatever the method
    for name, m in model.backbone.named_modules():
        in_method = any(name.startswith(p) for p, _ in adapter_modules(model.backbone))
        own = [f"{name}.{n}" if name else n for n, _ in m.named_parameters(recurse=False)]
        if in_method or (own and all(n in owned for n in own)):
            assert m.training, f"{name} trains, so it follows train mode"
        elif isinstance(m, _BatchNorm) and method != "full":
            assert not m.training, f"frozen BatchNorm {name} in train mode"
        elif policy == "eval":
            assert not m.training, f"{name} should stay in eval mode under the 'eval' policy"
    assert model.head.training or not has_head(case)


# -- adapter files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_adapter_file_round_trip_restores_outputs_exactly(method, case, tmp_path):
    model = build(method, case)
    train_steps(model)
    expected = eval_logits(model)
    size = save_adapter(model, tmp_path / "a.safetensors")
    assert size > 0
    fresh = build(method, case, seed=0)
    fresh_seed = build(method, case, seed=0)  # untouched copy to prove the load did something
    torch.manual_seed(123)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(eval_logits(fresh), expected)
    assert not torch.equal(eval_logits(fresh_seed), expected)


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_adapter_file_refuses_another_backbone_and_changes_nothing(method, case, tmp_path):
    model = build(method, case)
    save_adapter(model, tmp_path / "a.safetensors")
    other = build(method, case, other=True)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatch, match="made for backbone"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


# -- merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_merge_matches_unmerged_or_refuses(method, case):
    model = build(method, case)
    train_steps(model)
    if not model.method.can_merge(model.backbone):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(NotMergeable):
            model.merge()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a refused merge changes nothing"
        return
    expected = eval_logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.merge()
    torch.testing.assert_close(eval_logits(model), expected, atol=1e-4, rtol=0)
    model.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    original_keys = set(CASES[case].build().state_dict())
    unloaded = copy.deepcopy(model)
    unloaded.merge_and_unload()
    assert set(unloaded.backbone.state_dict()) == original_keys, "a merged model has exactly the backbone's keys"
    torch.testing.assert_close(eval_logits(unloaded), expected, atol=1e-4, rtol=0)


# -- identity at init, determinism, checkpointing ------------------------------------------------------


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_identity_at_init_as_declared(method, case):
    model = build(method, case)
    reference = pristine_features(case, model)
    adapted = features(model)
    if get_method(method).identity_at_init:
        assert torch.equal(adapted, reference)
    else:
        assert not torch.allclose(adapted, reference)
    if method != "full":
        with model.disabled():
            assert torch.equal(features(model), reference), "disabled() runs the frozen backbone"


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_disabled_is_the_pristine_backbone_after_training(method, case):
    """After AdamW steps (BitFit and LayerNorm tuning change backbone tensors in place), disabled() still
    runs exactly the pristine backbone, in eval mode, and puts everything back afterwards."""
    model = build(method, case)
    train_steps(model)
    if method == "full":
        with pytest.raises(NotSupported, match="trains every backbone tensor in place"):
            with model.disabled():
                pass
        return
    model.train()
    x = inputs(model, seed=99)[0]
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), model.disabled():
        frozen = model.backbone(x)
    reference = pristine_features(case, model)
    assert (frozen - reference).abs().max() <= 1e-6
    assert modes == {n: m.training for n, m in model.named_modules()}, "training flags restored"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "trained tensors restored"
    if method != "linear":
        assert not torch.equal(features(model), reference), "training moved the adapted model: disabled() undid it"


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_unload_gives_back_the_pristine_backbone(method, case):
    model = build(method, case)
    train_steps(model)
    if method == "full":
        with pytest.raises(NotMergeable, match="nothing to unload"):
            model.unload()
        return
    original_keys = set(CASES[case].build().state_dict())
    backbone = model.unload()
    assert set(backbone.state_dict()) == original_keys
    backbone.eval()
    with torch.no_grad():
        out = backbone(inputs(model, seed=99)[0])
    assert torch.equal(out, pristine_features(case, model))
    assert backbone._mmpeft_method is None


@pytest.mark.parametrize(("method", "case"), SUPPORTED)
def test_same_seed_same_outputs(method, case):
    outs = []
    for _ in range(2):
        model = build(method, case, seed=7)
        model.train()
        x = inputs(model)[0]
        torch.manual_seed(3)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("method", "case"),
    [p for p in SUPPORTED if hasattr(CASES[p.values[1]].build(), "set_grad_checkpointing")],
)
def test_activation_checkpointing_gives_identical_gradients(method, case):
    grads = []
    for ckpt in (False, True):
        model = build(method, case)
        model.backbone.set_grad_checkpointing(ckpt)
        model.train()
        x, y = inputs(model)
        torch.manual_seed(5)  # dropout and drop-path draws
        model.backbone.example_loss(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# -- bf16 mixed precision on CPU (Lightning's `bf16-mixed` is torch.autocast("cpu", bfloat16)) -------------


BF16_CASES = ("timm_vit", "point_mae", "timm_resnet", "sd_unet", "dit")  # one backbone per family


@pytest.mark.parametrize(("method", "case"), [p for p in SUPPORTED if p.values[1] in BF16_CASES])
def test_bf16_autocast_step_on_cpu_trains_fp32_tensors_and_follows_fp32(method, case):
    """Under CPU bf16 autocast every method runs a training step: trainable tensors, their gradients and the
    optimizer stay fp32, frozen tensors are untouched, and the loss follows the fp32 loss (bf16's 8-bit mantissa)."""
    model = build(method, case)
    model.train()
    x, y = inputs(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(5)
    reference = model.backbone.example_loss(model(x), y).detach()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.backbone.example_loss(model(x), y)
    loss.float().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for _, p in trained)
    grads = [(n, p.grad) for n, p in trained if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for _, g in grads)
    torch.optim.AdamW([p for _, p in trained], lr=1e-3).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) <= 0.05 * abs(reference.item()) + 0.05


def test_a_method_without_its_count_module_says_which_file_to_add():
    with pytest.raises(AssertionError, match="add tests/method_counts/no_such_method.py"):
        expected_count("no_such_method")


def _bf16_features(model: PeftModel, x) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model.backbone(x).float()


@pytest.mark.parametrize(("method", "case"), [p for p in SUPPORTED if p.values[1] in BF16_CASES])
def test_frozen_weights_in_bf16_keep_every_contract(method, case, tmp_path):
    """`frozen_dtype="bfloat16"`: the frozen matmul weights are stored in bf16 and everything that trains stays fp32;
    a training step under autocast leaves the frozen tensors bit-identical and follows the fp32 loss; disabled() is
    the pristine backbone with the same cast, exactly; merging writes bf16 and unmerging restores it bit for bit; the
    adapter file loads into an fp32 model (and its fingerprint is the one taken at load). Full fine-tuning refuses."""
    from mmpeft.core.precision import LOW_PRECISION_LAYERS, cast_frozen

    model = build(method, case)
    if model.method.trains_backbone:
        with pytest.raises(NotSupported, match="trains the whole backbone"):
            model.cast_frozen("bfloat16")
        return
    record = model.weights_records()
    assert model.cast_frozen("bfloat16") > 0
    for layer in model.modules():
        for tensor in layer.parameters(recurse=False):
            if tensor.requires_grad:
                assert tensor.dtype == torch.float32, "the trainable set stays fp32"
            elif isinstance(layer, LOW_PRECISION_LAYERS) and tensor.is_floating_point():
                assert tensor.dtype == torch.bfloat16
    assert model.weights_records() == record, "the fingerprint is the one taken at load, before the cast"
    fp32 = build(method, case)
    x, y = inputs(fp32)  # fp32 inputs (a denoiser draws its example batch in its first weight's dtype)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(5)
    reference = fp32.backbone.example_loss(fp32.train()(x), y).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.backbone.example_loss(model(x), y)
    loss.float().backward()
    optimizer.step()
    assert all(s.dtype == torch.float32 for state in optimizer.state.values() for s in state.values() if s.dim())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) <= 0.05 * abs(reference.item()) + 0.05
    model.eval()
    torch.manual_seed(0)  # the backbone's draws, as `build` makes them
    pristine = CASES[case].build().eval()
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}  # in place (DiffFit's table)
    for name, tensor in pristine.named_parameters():
        tensor.requires_grad_(name in trained)
    cast_frozen(pristine, "bfloat16")  # the same tensors in bf16 as in the adapted model
    x = inputs(fp32, seed=99)[0]
    with model.disabled():
        off = _bf16_features(model, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = pristine(x).float()
    assert torch.equal(off, expected), "disabled() is the pristine backbone with the same cast"
    if model.method.can_merge(model.backbone):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        unmerged = _bf16_features(model, x)
        model.merge()
        assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in weights.items()}
        torch.testing.assert_close(_bf16_features(model, x), unmerged, atol=0.1, rtol=0.05)  # bf16's rounding
        model.unmerge()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "unmerge is bit-exact"
    save_adapter(model, tmp_path / "bf16.safetensors")
    load_adapter(fp32, tmp_path / "bf16.safetensors")
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fp32.named_parameters() if p.requires_grad), "fp32 loads it"
