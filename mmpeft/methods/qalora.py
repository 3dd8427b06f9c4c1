"""EfficientDM's QALoRA layer (He et al., "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion
Models", ICLR 2024, arXiv 2310.03270; ThisisBillhe/EfficientDM `quant_scripts/quant_layer.py`,
`QuantModule_intnlora`): a linear or convolution whose computation is replaced (the core's `where="replace"`
attachment) by y = op(Q_a(x; s_x[t]), Q_w(W_base + B A; s_w)).

- W_base = (W_int - z_w) * s_w: the frozen weight on its per-channel grid. The integers and the zero points are
  derived state, rebuilt from the frozen weight when the piece is built; the step s_w is one trainable tensor shared
  by the dequantizer and the fake quantizer (the official code shares their storage), so a step on s_w rescales
  W_base as well.
- B A is a LoRA delta (a convolution's A has the host's kernel, B is 1 x 1), added before fake quantization, so the
  trained layer is still one quantized weight: nothing in floating point beside it. With B = 0 at init the merged
  weight is already on the grid and the layer is exactly the PTQ model.
- Q_a quantizes the layer's input per tensor with one (step, zero point) pair per denoising step
  (`mmpeft.core.quant.ActivationQuantizer`), the entry chosen by the forward context's `step`.
- A layer kept at 8 bits without LoRA (EfficientDM's first and last layers) is the same piece with `rank=0`: nothing
  of it trains (the official code leaves those layers out of every optimizer group, at their PTQ values), so its
  weight step is derived and its activation table a saved buffer.

The `efficientdm` method (which layers, PTQ calibration from the teacher's trajectory, data-free distillation, the
integer export) builds on this piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.modules import AdapterModule, LowRank
from mmpeft.core.quant import ActivationQuantizer, WeightQuantizer

__all__ = ["QALoRALayer"]


class QALoRALayer(AdapterModule):
    """Attached to an `nn.Linear` or `nn.Conv2d` with `where="replace"` (see the module docstring).

    Args:
        host: the frozen layer (its weight gives the integers, steps and zero points).
        w_bits, a_bits: weight and activation bits (2..8).
        rank: the LoRA rank (EfficientDM: 32); 0 for a layer kept at 8 bits without LoRA.
        timesteps: the denoising schedule the activation tables follow (one entry each; None: one entry).
    """

    def __init__(self, host: nn.Module, w_bits: int, a_bits: int, rank: int = 32, alpha: float | None = None,
                 timesteps: torch.Tensor | list[int] | None = None):  # fmt: skip
        super().__init__()
        if not isinstance(host, nn.Linear | nn.Conv2d):
            raise NotSupported(f"QALoRA quantizes nn.Linear and nn.Conv2d layers, not {type(host).__name__}")
        weight = host.weight.detach()
        self.is_conv = isinstance(host, nn.Conv2d)
        trains = rank > 0
        self.w_quant = WeightQuantizer(tuple(weight.shape), w_bits, device=weight.device, trainable=trains)
        self.w_quant.initialise(weight.float())
        self.register_derived("weight_int", self.w_quant.integers(weight.float()))
        self.lora = LowRank.for_layer(host, rank, alpha) if rank else None
        self.a_quant = ActivationQuantizer(a_bits, timesteps, device=weight.device, trainable=trains)

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits

    def base_weight(self) -> torch.Tensor:
        """W_base = (W_int - z_w) * s_w (differentiable in s_w)."""
        return (self.weight_int.to(self.w_quant.step.dtype) - self.w_quant.zero_point) * self.w_quant.step

    def merged_weight(self) -> torch.Tensor:
        """W_base + B A, before fake quantization."""
        weight = self.base_weight()
        return weight + self.lora.delta_weight().to(weight.dtype) if self.lora is not None else weight

    def quantized_weight(self) -> torch.Tensor:
        """Q_w(W_base + B A): the weight the layer computes with (on the grid)."""
        return self.w_quant(self.merged_weight())

    @torch.no_grad()
    def integers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integers uint8, step, zero point) of the trained layer: B A folded in and quantized once, the export."""
        step, zero = self.w_quant.step.detach().clone(), self.w_quant.zero_point.clone()
        return self.w_quant.integers(self.merged_weight()), step, zero

    def forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.a_quant(x, self.context)
        weight = self.quantized_weight().to(x.dtype)
        bias = host.bias.to(x.dtype) if host.bias is not None else None
        if self.is_conv:
            return F.conv2d(x, weight, bias, host.stride, host.padding, host.dilation, host.groups)
        return F.linear(x, weight, bias)
