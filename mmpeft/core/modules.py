"""Reusable trainable pieces. Methods compose these instead of writing their own copies.

Every piece derives from `AdapterModule`, which is how mmpeft tells method-owned modules from
the frozen backbone: they are switched off together by `disabled()`, they follow the training
mode while the frozen backbone follows the method's frozen-mode policy, and their parameters
(and persistent state) make up the adapter file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.errors import NotMergeable, NotSupported

__all__ = [
    "AdapterModule",
    "LowRank",
    "Bottleneck",
    "ScaleShift",
    "PromptTokens",
    "LocalAttention",
    "Gate",
    "adapter_modules",
    "call_piece",
    "make_activation",
]


class AdapterModule(nn.Module):
    """Base of every method-owned module (a *piece*).

    What a piece's tensors are decides where they go: parameters train and make up the adapter file;
    persistent buffers (`register_state`) are state that belongs in the adapter file too (a step
    count, calibrated quantizer ranges); non-persistent buffers (`register_derived`) are derived or
    frozen (singular vectors of a frozen weight, a retrieval bank, expert masks from a seed) and are
    rebuilt when the method is applied, never stored.

    `self.context` is the forward context of the backbone the piece is attached to (bound when the
    method is applied; None outside a forward or on a plain `nn.Module` backbone).

    Merging (one path for hook and site pieces, `Method.merge`): a mergeable piece returns the new
    values of its host's tensors from `merge_updates(host)` ("weight" for a layer hook; a dotted
    path such as "mlp.fc2.weight" for a piece on a block site). The core checks every value is
    finite before writing anything. `unmerge_updates(host)` undoes it; a piece without one gets its
    host tensors' pre-merge values saved by the core instead.
    """

    enabled: bool = True
    merged: bool = False
    context_slot = None  # set by Method.apply: the backbone's ContextSlot
    compute_dtype: torch.dtype | None = None  # set by Method.apply when the piece's dtype differs from the host's

    @property
    def context(self):
        slot = self.context_slot
        return slot.current if slot is not None else None

    def register_state(self, name: str, tensor: torch.Tensor) -> None:
        """A non-trainable tensor that belongs in the adapter file (persistent buffer)."""
        self.register_buffer(name, tensor, persistent=True)

    def register_derived(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor rebuilt from the frozen backbone or a seed when the method is applied; never saved."""
        self.register_buffer(name, tensor, persistent=False)

    def can_merge_into(self, host: nn.Module) -> bool:
        return type(self).merge_updates is not AdapterModule.merge_updates

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        raise NotMergeable(f"{type(self).__name__} cannot be folded into {type(host).__name__}")


def adapter_modules(root: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every method-owned module below `root` (nested pieces included)."""
    for name, module in root.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def call_piece(piece: nn.Module, *args, **kwargs):
    """Call a piece from the backbone's forward: floating tensors are cast to the piece's compute dtype
    (its parameters stay fp32 on an fp16 / bf16 backbone) and its output back to the host's dtype."""
    dtype = getattr(piece, "compute_dtype", None)
    if dtype is None:
        return piece(*args, **kwargs)
    host_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    cast = lambda a: a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a
    out = piece(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
    if host_dtype is not None and torch.is_tensor(out) and out.is_floating_point():
        return out.to(host_dtype)
    return out


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


def add_matmul(y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """`y + alpha * h @ weight.T` over the last dimension, in one fused op (one output tensor)."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(), alpha=alpha)
    return out.view(y.shape)


class LowRank(AdapterModule):
    """A low-rank weight delta `scale * B @ A` (A: kaiming-uniform, B: zero, so identity at init).

    On a convolution (`kernel_size` given) A is a k×k convolution down to `rank` channels with the
    host's stride, padding and dilation, and B a 1×1 convolution up (peft's LoRA on convolutions);
    the delta weight is then `B[:, :, 0, 0] @ A` reshaped to the host's kernel, so it merges exactly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        kernel_size: tuple[int, int] | None = None,
        stride: tuple[int, int] | int = 1,
        padding: tuple[int, int] | int | str = 0,
        dilation: tuple[int, int] | int = 1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.conv = kernel_size is not None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        kernel = tuple(kernel_size) if kernel_size is not None else ()
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, *kernel, **factory))
        self.B = nn.Parameter(torch.zeros(out_features, rank, *((1,) * len(kernel)), **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @classmethod
    def for_layer(cls, layer: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> LowRank:
        """A delta shaped for `layer`: an `nn.Linear` or an ungrouped `nn.Conv2d`."""
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        if isinstance(layer, nn.Linear):
            return cls(layer.in_features, layer.out_features, rank, alpha, dropout, **factory)
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise NotSupported(
                    f"low-rank deltas need an ungrouped, zero-padded Conv2d (groups={layer.groups}, "
                    f"padding_mode={layer.padding_mode!r})"
                )
            return cls(layer.in_channels, layer.out_channels, rank, alpha, dropout, layer.kernel_size, layer.stride,
                       layer.padding, layer.dilation, **factory)  # fmt: skip
        raise NotSupported(f"low-rank deltas support nn.Linear and nn.Conv2d, not {type(layer).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.conv:
            return F.conv2d(F.conv2d(x, self.A, None, self.stride, self.padding, self.dilation), self.B) * self.scale
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`y + self(x)`, on a linear as one `addmm` into a single new tensor: the delta, its scaled copy and
        the sum are never materialised apart, so a step allocates and frees two fewer output-sized blocks per
        layer (on CPU those transient blocks are what fragments the heap and lifts peak memory)."""
        if self.conv:
            return y + self(x)
        return add_matmul(y, F.linear(self.dropout(x), self.A), self.B, self.scale)

    def delta_weight(self) -> torch.Tensor:
        delta = self.B.flatten(1) @ self.A.flatten(1)
        return delta.view(self.B.shape[0], *self.A.shape[1:]) * self.scale


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


class _ScaleShiftSavingOutput(torch.autograd.Function):
    """`y * gamma (+ beta)` computed in place on `y`, keeping the result for backward: gamma's gradient needs
    the pre-scale y, recovered as (out - beta) / gamma. When the next layer keeps `out` for its own backward
    (the GELU after fc1, attention after qkv) the two share one tensor and the scale's save costs nothing; in
    place, the step allocates no second activation (on CPU those transients fragment the heap) and `out` keeps
    y's dtype (bf16 under autocast, as the merged layer's output would be). `y` must be a fresh tensor that
    nothing else holds: `linear_then_scale` passes the output of the addmm it just ran."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None):
        ctx.mark_dirty(y)
        out = _scale_in_place(y, gamma, beta)
        ctx.save_for_backward(out, gamma, beta)
        ctx.y_dtype = y.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        try:
            out, gamma, beta = ctx.saved_tensors
        except RuntimeError as err:
            if "inplace" not in str(err):
                raise
            raise RuntimeError(
                "a scale kept its output for backward (memory-lean mode) and a later in-place operation changed "
                "it; turn the lean mode off for this layer (SSF: lean_memory: false; DiffFit: lean_memory: false)"
            ) from err
        grad_gamma = grad_beta = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_sum = grad.sum(0, dtype=torch.float32) if beta is not None else None
            if ctx.needs_input_grad[2]:
                grad_beta = grad_sum.to(beta.dtype)
            if ctx.needs_input_grad[1]:  # sum(grad * (out - beta)) / gamma, with one temporary instead of three
                grad_out = (grad * out).sum(0, dtype=torch.float32)
                if beta is not None:
                    grad_out = grad_out - beta.float() * grad_sum
                grad_gamma = (grad_out / gamma.float()).to(gamma.dtype)
        grad_y = (grad * gamma.to(grad.dtype)).to(ctx.y_dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_gamma, grad_beta


def linear_then_scale(host: nn.Linear, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None):
    """`host(x) * gamma (+ beta)`, per output channel, keeping no activation of its own for backward: the linear
    runs as one addmm on the flattened input (F.linear's own kernel) and the scale applies in place on that
    fresh output, which is what backward keeps (`_ScaleShiftSavingOutput`). Exact up to rounding while no
    gamma is near zero."""
    flat = x.reshape(-1, x.shape[-1])
    weight = host.weight.t()
    y = torch.addmm(host.bias, flat, weight) if host.bias is not None else torch.mm(flat, weight)
    params = (gamma, beta) if beta is not None else (gamma,)
    if torch.is_grad_enabled() and (y.requires_grad or any(t.requires_grad for t in params)):
        y = _ScaleShiftSavingOutput.apply(y, gamma, beta)
    else:
        y = _scale_in_place(y, gamma, beta)
    return y.view(*x.shape[:-1], y.shape[-1])


def _scale_in_place(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """`y * gamma (+ beta)` in y's storage, with gamma and beta cast to y's dtype first: a bf16 y times an fp32
    gamma would run in fp32 through a full-size temporary and copy back, which is slower and allocates the
    very activation the in-place form avoids."""
    y = y.mul_(gamma.to(y.dtype))
    return y if beta is None else y.add_(beta.to(y.dtype))


# Norms whose forward is exactly `F.layer_norm` / `F.group_norm` with their weight and bias (timm's and
# open_clip's LayerNorm cast back to the input dtype, which the composed call does too).
_COMPOSABLE_NORMS = {
    "torch.nn.modules.normalization.LayerNorm": "layer_norm",
    "timm.layers.norm.LayerNorm": "layer_norm",
    "open_clip.transformer.LayerNorm": "layer_norm",
    "torch.nn.modules.normalization.GroupNorm": "group_norm",
}


def composable_norm(module: nn.Module) -> str | None:
    """ "layer_norm" / "group_norm" when `module` computes exactly that functional with its affine (so a
    scale-shift after it is the same norm with a composed affine), else None."""
    kind = _COMPOSABLE_NORMS.get(f"{type(module).__module__}.{type(module).__qualname__}")
    return kind if kind and getattr(module, "weight", None) is not None and module.bias is not None else None


class ScaleShift(AdapterModule):
    """Per-channel `y * gamma + beta` (SSF). `channel_dim=1` for NCHW convolution outputs.

    Memory: gamma's gradient needs the pre-scale `y`, which an output hook keeps. Attached with
    `where="replace"` the piece runs its host itself and keeps nothing of its own: on an `nn.Linear` it
    scales the fresh addmm output in place and keeps that output (`linear_then_scale`), which the next layer
    keeps anyway when it is attention or GELU; on a LayerNorm / GroupNorm (`composable_norm`) it runs the
    norm with the composed affine (weight * gamma, bias * gamma + beta), which keeps only the norm's input,
    as it does without SSF.
    """

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

    def forward(self, y: torch.Tensor | nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(y, nn.Module):  # attached with where="replace": run the host with the piece inside
            if type(y) is nn.Linear:
                return linear_then_scale(y, x, self.gamma, self.beta)
            return self.composed_norm(y, x)
        shape = self._shape(y)
        return y * self.gamma.view(shape) + self.beta.view(shape)

    def composed_norm(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = (host.weight * self.gamma).to(host.weight.dtype)
        bias = (host.bias * self.gamma + self.beta).to(host.bias.dtype)
        if composable_norm(host) == "group_norm":
            return F.group_norm(x, host.num_groups, weight, bias, host.eps)
        return F.layer_norm(x, host.normalized_shape, weight, bias, host.eps).to(x.dtype)

    def can_merge_into(self, host: nn.Module) -> bool:
        """Foldable into the layer that produced `y` when it has a weight and a bias (a shift needs the bias)."""
        return getattr(host, "weight", None) is not None and getattr(host, "bias", None) is not None

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """Fold into the layer that produced `y` (Linear, ConvNd, LayerNorm, GroupNorm, BatchNorm): the
        output channel is dim 0 of `weight` for all of these, so W' = diag(gamma) W, b' = gamma b + beta."""
        if not self.can_merge_into(host):
            raise NotMergeable(f"{type(host).__name__} has no weight and bias to fold a scale-shift into")
        g = self.gamma.float()
        weight = host.weight.float() * g.view((-1,) + (1,) * (host.weight.dim() - 1))
        bias = host.bias.float() * g + self.beta.float()
        return {"weight": weight.to(host.weight.dtype), "bias": bias.to(host.bias.dtype)}


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


def context_dropout_mask(ctx, key: str, shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout keep mask (scaled by 1 / (1 - p)) drawn through the forward context, so a checkpointed
    recompute draws the same one (VPT's and Point-PEFT's prompt dropout)."""
    keep = ctx.draw(key, lambda g: torch.rand(shape, generator=g) >= p)
    return keep.to(device=like.device, dtype=like.dtype) / (1.0 - p)


class LocalAttention(nn.Module):
    """A narrow pre-LayerNorm self-attention inside small token sets, with its own residual: qkv D -> 3 x inner,
    `heads` heads of inner / heads, softmax scale inner^-1/2 (the value Point-PEFT's and Any2Point's official
    code use, not the head width's), proj inner -> D. Point-PEFT runs it inside kNN groups, Any2Point over the
    tokens of one sample with a cell mask; both share one module across blocks. `zero_out`: the output
    projection starts at zero, so the residual is the identity at init."""

    def __init__(self, dim: int, inner: int, heads: int, qkv_bias: bool = False, zero_out: bool = False,
                 device: torch.device | None = None):  # fmt: skip
        super().__init__()
        if inner % heads:
            raise ValueError(f"local attention width {inner} does not split into {heads} heads")
        self.heads, self.inner = heads, inner
        self.norm = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, device=device)
        self.proj = nn.Linear(inner, dim, device=device)
        if zero_out and self.proj.weight.device.type != "meta":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, k, D] token sets -> the same plus the attention's output; `mask` [N, k, k] (True: attend)."""
        n, k, _ = x.shape
        q, kk, v = self.qkv(self.norm(x)).reshape(n, k, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mask = mask.unsqueeze(1) if mask is not None else None
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, scale=self.inner**-0.5)
        return x + self.proj(out.transpose(1, 2).reshape(n, k, self.inner))
