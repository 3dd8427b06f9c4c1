"""A frozen convolution whose bias trains adds the bias after the convolution (`mmpeft.core.conv_bias`), so
backward never asks oneDNN for a bias gradient (which computes the whole weight gradient with it)."""

from __future__ import annotations

import pytest
import torch

from mmpeft.core.conv_bias import restore_conv_forwards
from mmpeft.core.model import PeftModel
from tests.conftest import tiny_unet


def conv_nodes_asking_for_bias(loss: torch.Tensor) -> tuple[int, int]:
    """(convolution backward nodes, those with a bias gradient edge) in the graph of `loss`."""
    seen, stack, convs, with_bias = set(), [loss.grad_fn], 0, 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "ConvolutionBackward0":
            convs += 1
            with_bias += node.next_functions[2][0] is not None
        stack.extend(fn for fn, _ in node.next_functions)
    return convs, with_bias


def step(model: PeftModel, x, y) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = model.backbone.example_loss(out, y)
    loss.backward()
    return out.detach(), loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["bitfit", "difffit"])
def test_trained_conv_biases_are_added_apart_with_the_same_function_and_gradients(method):
    torch.manual_seed(0)
    model = PeftModel(tiny_unet(), method).train()
    x, y = model.backbone.example_batch(2, torch.Generator().manual_seed(0))
    out, loss, grads = step(model, x, y)
    convs, with_bias = conv_nodes_asking_for_bias(loss)
    assert convs > 20 and with_bias == 0, "no frozen convolution asks for its bias gradient"

    restore_conv_forwards(model.backbone)  # the plain route: every conv computes its bias gradient itself
    plain_out, plain_loss, plain_grads = step(model, x, y)
    assert conv_nodes_asking_for_bias(plain_loss)[1] >= convs  # (+ conv_in, which needs no backward node now)
    torch.testing.assert_close(out, plain_out, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-4)


def test_without_gradients_and_after_unload_the_convolutions_run_their_own_forward():
    torch.manual_seed(0)
    model = PeftModel(tiny_unet(), "bitfit").eval()
    routed = [m for m in model.backbone.modules() if "forward" in m.__dict__]
    assert routed and all(isinstance(m, torch.nn.Conv2d) for m in routed)
    x, _ = model.backbone.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed_out = model(x)
    backbone = model.unload()
    assert not any("forward" in m.__dict__ for m in backbone.modules())
    with torch.no_grad():
        assert torch.equal(backbone(x), routed_out), "evaluation runs the convolution with its bias, as before"


def test_a_frozen_bias_or_a_trained_weight_keeps_the_plain_convolution():
    torch.manual_seed(0)
    lora = PeftModel(tiny_unet(), "lora")  # biases frozen: nothing routed
    assert not any("forward" in m.__dict__ for m in lora.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    full = PeftModel(tiny_unet(), "full")  # weights train: their gradient is wanted anyway
    assert not any("forward" in m.__dict__ for m in full.backbone.modules() if isinstance(m, torch.nn.Conv2d))
