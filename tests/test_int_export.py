"""EfficientDM's integer export (`mmpeft.interop.int_export`): one safetensors file of packed integers that a fresh
backbone loads into the same function as the fake-quantized QALoRA model it came from.

Tolerances: "dequantize" mode computes with the very weights the fake quantizer produces (same integers, same
float arithmetic), so the whole model must agree to 1e-6 of the output's scale. "int" mode sums in int32: each
layer must agree with the dequantized layer on the same input to 1e-5 of its output's scale (float32 rounding of
the other's sum); across a whole network those last-bit differences may move an activation across a rounding
boundary of the next quantizer, so the int path is checked layer by layer.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import AdapterMismatch, NotSupported, OutputExists
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules
from mmpeft.interop.int_export import IntLayer, export_int, int_mm_works, load_int_model
from mmpeft.methods.efficientdm import leading_timesteps, quantizers
from mmpeft.methods.qalora import QALoRALayer
from tests.conftest import tiny_dit, tiny_unet

STEPS = (3, 70)  # two denoising steps whose activation-table entries differ


def trained(build, w_bits: int, a_bits: int = 8) -> PeftModel:
    """A calibrated EfficientDM model moved as training would: LoRA B, weight steps and every table entry."""
    torch.manual_seed(0)
    model = PeftModel(build(), {"name": "efficientdm", "w_bits": w_bits, "a_bits": a_bits, "rank": 4, "steps": 100})
    inputs = model.backbone.example_batch(8, torch.Generator().manual_seed(321), None)[0]
    model.method.calibrate(model.backbone, inputs, leading_timesteps(100))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, piece in adapter_modules(model.backbone):
            if isinstance(piece, QALoRALayer) and piece.lora is not None:
                piece.lora.B.normal_(0, 0.05, generator=g)
                piece.w_quant.step.mul_(1 + 0.01 * torch.randn(piece.w_quant.step.shape, generator=g))
        for q in quantizers(model.backbone):
            q.step.mul_(torch.empty(q.num_steps).uniform_(0.8, 1.25, generator=g))
            high = 2**q.bits - 1
            q.zero_point.add_(torch.randint(-2, 3, (q.num_steps,), generator=g)).clamp_(0, high)
    return model.eval()


def batch(model: PeftModel, step: int | None) -> BackboneInput:
    x = model.backbone.example_batch(4, torch.Generator().manual_seed(7), None)[0]
    return BackboneInput(x.x, x.timestep, x.cond, step=step)


@pytest.fixture(scope="module", params=["dit", "unet"])
def exported(request, tmp_path_factory):
    """(trained W4A8 model, its export, the backbone builder)."""
    build = {"dit": tiny_dit, "unet": tiny_unet}[request.param]
    model = trained(build, 4)
    return model, export_int(model, tmp_path_factory.mktemp("int") / "model.safetensors"), build


@torch.no_grad()
def test_loaded_model_reproduces_the_fake_quantized_model(exported):
    model, path, build = exported
    loaded = load_int_model(path, build(), mode="dequantize")
    outputs = {}
    for step in STEPS:
        ref, out = model(batch(model, step)), loaded(batch(model, step))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
        outputs[step] = out
    assert not torch.allclose(outputs[STEPS[0]], outputs[STEPS[1]])  # the step picked another table entry
    ref, out = model(batch(model, None)), loaded(batch(model, None))  # no step: each sample's nearest timestep
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    with pytest.raises(NotSupported, match="released its float weights"):  # no silent zero-weight teacher
        with loaded.disabled():
            pass


@torch.no_grad()
def test_use_schedule_reads_the_tables_as_the_trained_model_does(exported):
    model, path, build = exported
    loaded = load_int_model(path, build())
    schedule = leading_timesteps(10)
    model.method.use_schedule(model.backbone, schedule)
    loaded.method.use_schedule(loaded.backbone, schedule)
    try:
        ref, out = model(batch(model, 4)), loaded(batch(model, 4))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    finally:
        model.method.use_schedule(model.backbone, None)


def check_int_layers(path, build, model: PeftModel) -> int:
    """Every integer-matmul layer against the dequantized layer on the very same input; returns how many ran."""
    int_model, dense = load_int_model(path, build(), mode="int"), load_int_model(path, build())
    dense_layers = dict(adapter_modules(dense.backbone))
    checked = []

    def compare(layer, args, out, name):
        host, x = args
        ref_layer = dense_layers[name]
        ref = F.linear(layer.a_quant(x, layer.context), ref_layer.weight, ref_layer.bias)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item() + 1e-7)
        checked.append(name)

    for name, layer in adapter_modules(int_model.backbone):
        if isinstance(layer, IntLayer) and layer.int_path:
            layer.register_forward_hook(lambda m, a, o, name=name: compare(m, a, o, name))
    with torch.no_grad():
        for step in STEPS:
            int_model(batch(model, step))
    return len(checked)


@pytest.mark.skipif(not int_mm_works(), reason="torch._int_mm does not run here")
def test_int_matmul_layers_match_the_dequantized_layers(exported, tmp_path):
    model, path, build = exported
    assert check_int_layers(path, build, model) > 0
    if build is tiny_dit:  # W8A8: 8-bit weights take the shift-by-128 path with its correction term
        model8 = trained(tiny_dit, 8)
        path8 = export_int(model8, tmp_path / "w8a8.safetensors")
        assert check_int_layers(path8, tiny_dit, model8) > 0
        loaded = load_int_model(path8, tiny_dit())
        with torch.no_grad():
            ref, out = model8(batch(model8, 3)), loaded(batch(model8, 3))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())


def test_file_is_packed_and_small(exported):
    model, path, build = exported
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        four_bit = [p for p in adapter_modules(model.backbone) if isinstance(p[1], QALoRALayer) and p[1].w_bits == 4]
        name = four_bit[0][0].removesuffix(".qalora")
        packed = f.get_tensor(f"layers.{name}.weight")
        rows = four_bit[0][1].weight_int.shape
    assert packed.dtype == torch.uint8 and packed.shape == ((rows[0] + 1) // 2, *rows[1:])  # two per byte
    assert f"backbone.{name}.weight" not in keys  # the float weight the integers replace is not stored
    if build is tiny_unet:
        fp32 = sum(t.numel() * 4 for t in build().state_dict().values())
        assert path.stat().st_size < 0.4 * fp32


def test_mismatched_backbone_is_refused_and_left_alone(exported):
    _, path, build = exported
    other = build(num_layers=3) if build is tiny_dit else build(layers_per_block=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatch, match="was made for backbone .* but the backbone given is"):
        load_int_model(path, other)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not list(adapter_modules(other)) and getattr(other, "_mmpeft_method", None) is None


def test_existing_file_is_kept_unless_overwrite(exported):
    model, path, _ = exported
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    with pytest.raises(OutputExists):
        export_int(model, path)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == digest
    assert export_int(model, path, overwrite=True) == path
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_uncalibrated_or_other_method_is_refused(tmp_path):
    fresh = PeftModel(tiny_dit(), {"name": "efficientdm", "w_bits": 4, "a_bits": 8, "rank": 4})
    with pytest.raises(NotSupported, match="not calibrated"):
        export_int(fresh, tmp_path / "a.safetensors")
    with pytest.raises(NotSupported, match="EfficientDM"):
        export_int(PeftModel(tiny_dit(), {"name": "lora", "r": 2}), tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())
