"""Trained biases of frozen convolutions, added after the convolution instead of inside it.

On CPU, oneDNN's convolution backward computes the whole weight gradient whenever the bias gradient is asked
for (ATen's `mkldnn_convolution_backward` calls its weight-gradient kernel when `output_mask[1] ||
output_mask[2]`). A frozen convolution whose bias trains (BitFit, DiffFit, every bias of a UNet) would pay a
weight-gradient convolution per step, as costly as the layer's forward, for a gradient that is only the sum of
the output gradient over batch and space. Such a convolution runs here without its bias and adds the bias in
place afterwards: its backward computes the input gradient only, and the bias gradient is that sum. The
function is the same up to the rounding of one addition; without gradients (evaluation, `disabled()`, merged
inference) the convolution runs as it always does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["bias_apart", "restore_conv_forwards"]


class _BiasApartForward:
    """The instance-level `forward` of a frozen convolution whose bias trains (see the module docstring)."""

    def __init__(self, conv: _ConvNd):
        self.conv = conv

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        conv = self.conv
        bias = conv.bias
        if (args or kwargs or x.device.type != "cpu" or not torch.is_grad_enabled() or bias is None
                or not bias.requires_grad or conv.weight.requires_grad):  # fmt: skip
            return type(conv).forward(conv, x, *args, **kwargs)
        y = conv._conv_forward(x, conv.weight, None)
        return y.add_(bias.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2))))


def bias_apart(backbone: nn.Module) -> list[str]:
    """Route every frozen `nn.Conv1d/2d/3d` of `backbone` whose bias trains through `_BiasApartForward`; returns
    their names. A convolution whose forward a method already replaced keeps that forward."""
    names = []
    for name, module in backbone.named_modules():
        if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or "forward" in module.__dict__:
            continue
        if module.bias is not None and module.bias.requires_grad and not module.weight.requires_grad:
            module.forward = _BiasApartForward(module)
            names.append(name)
    return names


def restore_conv_forwards(backbone: nn.Module) -> None:
    """Undo `bias_apart`: every convolution runs its class's forward again."""
    for module in backbone.modules():
        if isinstance(module.__dict__.get("forward"), _BiasApartForward):
            del module.__dict__["forward"]
