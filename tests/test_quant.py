"""The core quantizers (EfficientDM's, spec diffusion.md 2.2 and 2.9): grid, gradients, per-step tables, packing."""

from __future__ import annotations

import pytest
import torch

from mmpeft.core.context import ForwardContext
from mmpeft.core.quant import (
    ActivationQuantizer,
    WeightQuantizer,
    fake_quantize,
    lp_search_params,
    minmax_params,
    pack_ints,
    quantize_to_int,
    unpack_ints,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weights_land_on_the_grid_inside_the_integer_range_and_requantizing_is_exact(bits):
    weight = torch.randn(6, 5, 3, 3)
    quant = WeightQuantizer(tuple(weight.shape), bits)
    quant.initialise(weight)
    assert quant.step.shape == (6, 1, 1, 1) and not quant.zero_point.requires_grad
    fq = quant(weight)
    levels = fq / quant.step + quant.zero_point
    assert (levels - levels.round()).abs().max() < 1e-4
    assert levels.round().min() >= 0 and levels.round().max() <= 2**bits - 1
    assert torch.equal(quant(fq), fq), "an on-grid weight quantizes to itself"
    ints = quant.integers(weight)
    assert ints.dtype == torch.uint8 and torch.equal((ints.float() - quant.zero_point) * quant.step, fq)


def test_minmax_widens_each_channel_to_include_zero():
    weight = torch.tensor([[1.0, 2.0, 3.0], [-3.0, -2.0, -1.0]])
    step, zero = minmax_params(weight, 4, dim=0)
    torch.testing.assert_close(step.flatten(), torch.tensor([3.0, 3.0]) / 15)
    assert zero.flatten().tolist() == [0.0, 15.0]  # ranges [0, 3] and [-3, 0]


def test_gradients_reach_the_weight_step_and_pass_straight_through_to_the_weight():
    weight = torch.randn(4, 8, requires_grad=True)
    quant = WeightQuantizer((4, 8), 4)
    quant.initialise(weight)
    quant(weight).pow(2).sum().backward()
    assert quant.step.grad is not None and quant.step.grad.abs().sum() > 0
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_the_lp_search_beats_min_max_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.where(torch.rand(4096, generator=g) < 0.01, 20.0, 1.0)
    lp_step, lp_zero = lp_search_params(x, 4)
    mm_step, mm_zero = minmax_params(x, 4, dim=None)

    def err(step, zero):
        return (fake_quantize(x, step, zero, 4) - x).abs().pow(2.4).mean()

    assert err(lp_step, lp_zero) < err(mm_step, mm_zero)


def _quantizer(steps: int = 10) -> ActivationQuantizer:
    quant = ActivationQuantizer(4, timesteps=torch.arange(steps - 1, -1, -1) * 100)  # 900, 800, ..., 0
    quant.calibrate(torch.randn(1000))
    with torch.no_grad():
        quant.step.mul_(torch.linspace(0.5, 1.5, steps))  # distinct entries
    return quant


def test_the_active_table_entry_is_the_context_step_and_only_it_gets_a_gradient():
    quant = _quantizer()
    x = torch.randn(2, 3, 8)
    out = quant(x, ForwardContext(step=3))
    torch.testing.assert_close(out, fake_quantize(x, quant.step[3], quant.zero_point[3], 4))
    out.pow(2).sum().backward()
    assert quant.step.grad[3] != 0 and quant.step.grad.count_nonzero() == 1
    assert quant.zero_point.grad.count_nonzero() <= 1


def test_guidance_batched_or_as_two_calls_gives_the_same_quantization():
    """The entry comes from the sampler's step, not from a counter of calls."""
    quant = _quantizer()
    cond, uncond = torch.randn(2, 8), torch.randn(2, 8)
    batched = quant(torch.cat([cond, uncond]), ForwardContext(step=4))
    two_calls = torch.cat([quant(cond, ForwardContext(step=4)), quant(uncond, ForwardContext(step=4))])
    assert torch.equal(batched, two_calls)


def test_without_a_step_each_sample_takes_the_nearest_timestep_and_neither_is_refused():
    quant = _quantizer()
    x = torch.randn(2, 8)
    out = quant(x, ForwardContext(timestep=torch.tensor([790, 120])))  # nearest: 800 (index 1), 100 (index 8)
    torch.testing.assert_close(out[0], fake_quantize(x[0], quant.step[1], quant.zero_point[1], 4))
    torch.testing.assert_close(out[1], fake_quantize(x[1], quant.step[8], quant.zero_point[8], 4))
    with pytest.raises(ValueError, match="neither"):
        quant(x, ForwardContext())
    with pytest.raises(IndexError, match="resample"):
        quant(x, ForwardContext(step=10))


def test_resampling_strides_like_the_released_code_or_interpolates_like_the_paper():
    quant = ActivationQuantizer(8, timesteps=torch.arange(99, -1, -1) * 10)
    with torch.no_grad():
        quant.step.copy_(torch.rand(100) + 0.1)
        quant.zero_point.copy_(torch.arange(100.0))
    strided = ActivationQuantizer(8, timesteps=quant.timesteps)
    strided.load_state_dict(quant.state_dict())
    strided.resample(quant.timesteps[::5], mode="stride")
    assert torch.equal(strided.step, quant.step[::5]) and strided.num_steps == 20
    same = ActivationQuantizer(8, timesteps=quant.timesteps)
    same.load_state_dict(quant.state_dict())
    same.resample(quant.timesteps[::5])  # interpolation at trained timesteps returns the trained entries
    torch.testing.assert_close(same.step, quant.step[::5])
    between = ActivationQuantizer(8, timesteps=quant.timesteps)
    between.load_state_dict(quant.state_dict())
    between.resample([995, 5])  # 995: beyond t = 990 (entry 0), held; 5: halfway between t = 10 and t = 0
    torch.testing.assert_close(between.zero_point, torch.tensor([0.0, 98.5]))
    with pytest.raises(ValueError, match="interpolate"):
        quant.resample([995, 5], mode="stride")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 6, 7])
def test_packing_round_trips(bits, rows):
    values = torch.randint(0, 2**bits, (rows, 5), dtype=torch.uint8)
    packed = pack_ints(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape[0] == -(-rows // (8 // bits))
    assert torch.equal(unpack_ints(packed, bits, rows), values)


def test_four_bit_weights_pack_two_to_a_byte():
    weight = torch.randn(64, 32)
    step, zero = minmax_params(weight, 4)
    packed = pack_ints(quantize_to_int(weight, step, zero, 4), 4)
    assert packed.numel() == weight.numel() // 2


# -- the QALoRA layer (EfficientDM; spec diffusion.md 2.3, 2.9) ----------------------------------------------------


def _qalora_layer(conv: bool, rank: int = 4):
    from mmpeft.core.inject import attach
    from mmpeft.methods.qalora import QALoRALayer

    torch.manual_seed(0)
    host = torch.nn.Conv2d(3, 6, 3, padding=1) if conv else torch.nn.Linear(8, 6)
    host.requires_grad_(False)
    piece = QALoRALayer(host, w_bits=4, a_bits=8, rank=rank, timesteps=[900, 500, 100])
    piece.a_quant.calibrate(torch.randn(256))
    attach(host, "qalora", piece, where="replace")
    x = torch.randn(2, 3, 5, 5) if conv else torch.randn(2, 8)
    return host, piece, x


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_qalora_is_exactly_the_ptq_layer_at_init_and_stays_on_the_grid_after_training(conv):
    host, piece, x = _qalora_layer(conv)
    ctx = ForwardContext(step=1)
    assert torch.equal(piece.quantized_weight(), piece.base_weight()), "B = 0: the dequantized weight, untouched"
    with torch.no_grad():
        piece.lora.B.normal_(std=0.05)  # as after training
    w = piece.quantized_weight()
    levels = w / piece.w_quant.step + piece.w_quant.zero_point
    assert (levels - levels.round()).abs().max() < 1e-4 and levels.round().min() >= 0 and levels.round().max() <= 15
    ints, step, zero = piece.integers()
    assert torch.equal((ints.float() - zero) * step, w), "the export is the layer's own weight: LoRA folded in once"
    from mmpeft.core.context import ContextSlot

    piece.context_slot = ContextSlot()
    with piece.context_slot.active(ctx):
        y = host(x)
    op = torch.nn.functional.conv2d if conv else torch.nn.functional.linear
    extra = (host.stride, host.padding) if conv else ()
    expected = op(piece.a_quant(x, ctx), (ints.float() - zero) * step, host.bias, *extra)
    torch.testing.assert_close(y, expected)


def test_qalora_gradients_reach_b_the_weight_step_and_only_the_active_activation_entry():
    host, piece, x = _qalora_layer(conv=False)
    from mmpeft.core.context import ContextSlot

    piece.context_slot = ContextSlot()
    with piece.context_slot.active(ForwardContext(step=2)):
        host(x).pow(2).sum().backward()
    assert piece.lora.B.grad.abs().sum() > 0 and piece.lora.A.grad.abs().sum() == 0  # B = 0 at the first step
    assert piece.w_quant.step.grad.abs().sum() > 0
    grads = piece.a_quant.step.grad
    assert grads[2] != 0 and grads.count_nonzero() == 1
    assert not host.weight.requires_grad and host.weight.grad is None


def test_a_layer_kept_at_eight_bits_has_no_lora_and_what_is_derived_is_not_state():
    from mmpeft.methods.qalora import QALoRALayer

    host = torch.nn.Linear(8, 6)
    piece = QALoRALayer(host, w_bits=8, a_bits=8, rank=0)
    assert piece.lora is None and piece.w_bits == 8
    assert not list(piece.parameters()), "nothing of an 8-bit layer trains: it stays at its PTQ values"
    state = piece.state_dict()
    assert "weight_int" not in state and "w_quant.zero_point" not in state and "w_quant.step" not in state
    assert {"a_quant.step", "a_quant.zero_point", "a_quant.timesteps", "a_quant.calibrated"} <= set(state)
    trained = QALoRALayer(host, w_bits=4, a_bits=8, rank=2)
    assert {"w_quant.step", "a_quant.step", "a_quant.zero_point", "lora.A", "lora.B"} == {
        n for n, _ in trained.named_parameters()
    }
    assert "w_quant.step" in trained.state_dict()
