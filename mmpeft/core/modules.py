"""Reusable trainable pieces. Methods compose these instead of writing their own copies.

Every piece derives from `AdapterModule`, which is how mmpeft tells method-owned modules from
the frozen backbone: they are switched off together by `disabled()`, they follow the training
mode while the frozen backbone follows the method's frozen-mode policy, and their parameters
make up the adapter file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.errors import NotMergeable

__all__ = [
    "AdapterModule",
    "LowRank",
    "Bottleneck",
    "ScaleShift",
    "PromptTokens",
    "Gate",
    "disabled",
    "adapter_modules",
    "make_activation",
]


class AdapterModule(nn.Module):
    """Base of every method-owned module: can be switched off and remembers if it was merged."""

    enabled: bool = True
    merged: bool = False


def adapter_modules(root: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    for name, module in root.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


@contextlib.contextmanager
def disabled(root: nn.Module) -> Iterator[nn.Module]:
    """Run `root` with every method module switched off: the frozen backbone, without a copy.

    Used for teachers and queries (EfficientDM, Point-PEFT) and to test identity at init.
    """
    modules = [m for _, m in adapter_modules(root)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield root
    finally:
        for m, flag in zip(modules, before):
            m.enabled = flag


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "quick_gelu": None, "identity": nn.Identity}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class LowRank(AdapterModule):
    """A low-rank weight delta `scale * B @ A` (A: kaiming-uniform, B: zero, so identity at init)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


class Bottleneck(AdapterModule):
    """down -> activation -> dropout -> up, times a scale; optional LayerNorm on the input.

    The up projection starts at zero (AdaptFormer's "lora" init) so the adapter is the identity
    at init while the down projection still receives gradients. Zeroing both projections, as
    VPT's Adapter does, leaves every weight gradient at zero; that init is refused.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        out_dim: int | None = None,
        activation: str = "relu",
        scale: float = 1.0,
        dropout: float = 0.0,
        norm: bool = False,
        init: str = "zero_up",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if init not in ("zero_up", "xavier"):
            hint = " (zeroing down and up freezes every weight: VPT's Adapter bug)" if init == "zeros" else ""
            raise ValueError(f"unknown adapter init {init!r}{hint}; use 'zero_up' or 'xavier'")
        factory = {"device": device, "dtype": dtype}
        self.scale = scale
        self.norm = nn.LayerNorm(dim, **factory) if norm else nn.Identity()
        self.down = nn.Linear(dim, hidden, **factory)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(hidden, out_dim or dim, **factory)
        if self.down.weight.device.type != "meta":
            if init == "zero_up":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.down.bias)
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
            else:
                for lin in (self.down, self.up):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(self.norm(x))))) * self.scale


class ScaleShift(AdapterModule):
    """Per-channel `y * gamma + beta` (SSF). `channel_dim=1` for NCHW convolution outputs."""

    def __init__(
        self,
        dim: int,
        init: str = "identity",
        std: float = 0.02,
        channel_dim: int = -1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.channel_dim = channel_dim
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        if init == "normal":
            if self.gamma.device.type != "meta":
                nn.init.normal_(self.gamma, 1.0, std)
                nn.init.normal_(self.beta, 0.0, std)
        elif init != "identity":
            raise ValueError(f"unknown scale-shift init {init!r}; use 'identity' or 'normal'")

    def _shape(self, y: torch.Tensor) -> tuple[int, ...]:
        if self.channel_dim in (-1, y.dim() - 1):
            return (-1,)
        return (-1,) + (1,) * (y.dim() - 1 - self.channel_dim % y.dim())

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        shape = self._shape(y)
        return y * self.gamma.view(shape) + self.beta.view(shape)

    @staticmethod
    def can_merge_into(layer: nn.Module) -> bool:
        return getattr(layer, "weight", None) is not None and getattr(layer, "bias", None) is not None

    @torch.no_grad()
    def fold_into(self, layer: nn.Module) -> None:
        """Fold into the layer that produced `y` (Linear, ConvNd, LayerNorm, GroupNorm, BatchNorm).

        The output channel is dim 0 of `weight` for all of these: W' = diag(gamma) W,
        b' = gamma * b + beta.
        """
        if getattr(layer, "bias", None) is None or getattr(layer, "weight", None) is None:
            raise NotMergeable(f"{type(layer).__name__} has no weight and bias to fold a scale-shift into")
        g = self.gamma.to(layer.weight.dtype)
        layer.weight.mul_(g.view((-1,) + (1,) * (layer.weight.dim() - 1)))
        layer.bias.mul_(g).add_(self.beta.to(layer.bias.dtype))


class PromptTokens(AdapterModule):
    """`depth` sets of `length` learnable tokens, uniform on [-bound, bound]."""

    def __init__(
        self,
        length: int,
        dim: int,
        depth: int = 1,
        bound: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(depth, length, dim, device=device, dtype=dtype))
        self.bound = bound if bound is not None else math.sqrt(6.0 / (2 * dim))
        if self.tokens.device.type != "meta":
            nn.init.uniform_(self.tokens, -self.bound, self.bound)

    def forward(self, depth_index: int, batch: int) -> torch.Tensor:
        return self.tokens[depth_index].unsqueeze(0).expand(batch, -1, -1)


class Gate(AdapterModule):
    """A learnable scalar or per-channel gate, initialised to a constant."""

    def __init__(self, shape: tuple[int, ...] = (1,), init: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.value = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value
