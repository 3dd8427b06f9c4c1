"""SVFit (Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular
Values", arXiv 2409.05926, 2024).

No official code exists; this file is mmpeft's reading of the paper (see `SVFit`'s docstring for what is
the paper's and what is ours).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.fused import add_to_parts, parse_fused_target, part_rows, parts_delta_weight
from mmpeft.core.inject import attach
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import AdapterModule, adapter_modules
from mmpeft.core.targets import LINEAR_TARGETS_HELP, select_modules
from mmpeft.methods.lora import DENOISER_TARGETS

__all__ = [
    "SVFit",
    "SVFitDelta",
    "Spectrum",
    "energy_rank",
    "svfit_ranks",
    "derived_state_bytes",
    "DEFAULT_TARGETS",
    "ENERGY_OF",
]

ENERGY_OF = ("sq", "sum")

# Default targets per backbone family. Token backbones: the q and v thirds of every fused qkv, the matrices
# LoRA's default adapts, so the two methods are compared matrix for matrix (full spectrum: d per d x d
# matrix against LoRA-r8's 16 d, the paper's "16 times fewer"). Denoisers: the attention projections
# (to_q, to_k, to_v, to_out.0, plus add_k_proj / add_v_proj where present), as the spec's SD1.5 comparison.
DEFAULT_TARGETS = {"token": ("attn.qkv[q,v]",), "unet": DENOISER_TARGETS, "dit": DENOISER_TARGETS}


def energy_rank(sigma: torch.Tensor, threshold: float, of: str = "sq") -> int:
    """The smallest r whose top-r singular values hold at least `threshold` of the spectrum's energy.

    `of="sq"`: E(r) = sum_{i<=r} sigma_i^2 / sum_i sigma_i^2 (the squared Frobenius norm kept by the best
    rank-r approximation); `of="sum"`: E(r) = sum_{i<=r} sigma_i / sum_i sigma_i. `sigma` is sorted in
    descending order (as an SVD returns it). An all-zero spectrum gives r = 1. At least 1, at most len(sigma).
    """
    if of not in ENERGY_OF:
        raise ValueError(f"energy_of must be one of {ENERGY_OF}, got {of!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"an energy threshold is in (0, 1], got {threshold}")
    values = sigma.detach().to(torch.float64).flatten()
    energy = values.square() if of == "sq" else values.abs()
    cumulative = energy.cumsum(0)
    total = cumulative[-1]
    if total <= 0:
        return 1
    below = int((cumulative < threshold * total).sum())
    return min(below + 1, values.numel())


def _svd64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 on the matrix's device (on the CPU where float64 is unavailable, e.g. MPS)."""
    device = matrix.device if matrix.device.type in ("cpu", "cuda") else torch.device("cpu")
    return torch.linalg.svd(matrix.detach().to(device=device, dtype=torch.float64), full_matrices=False)


class Spectrum(AdapterModule):
    """The top-r singular values of one frozen matrix W (out x in; a convolution's kernel reshaped to
    out x in·kh·kw) as trainable `sigma`, with its delta `U_r diag(sigma - sigma0) V_r^T`.

    `sigma` starts at `sigma0`, so the delta is exactly zero at init. `U` (out x r), `Vh` (r x in·kh·kw) and
    `sigma0` are derived state (non-persistent buffers): recomputed from the frozen weight whenever the method
    is applied, never saved. On the meta device no SVD is possible: the tensors get their shapes only (a
    fixed `rank` is then required).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int | None = None,
        energy: float | None = None,
        energy_of: str = "sq",
        kernel_size: tuple[int, int] | None = None,
        stride: tuple[int, int] | int = 1,
        padding: tuple[int, int] | int | str = 0,
        dilation: tuple[int, int] | int = 1,
    ):
        super().__init__()
        out, cols = weight.shape[0], math.prod(weight.shape[1:])
        full = min(out, cols)
        self.conv = kernel_size is not None
        self.kernel = tuple(kernel_size) if kernel_size is not None else ()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # fp32 at least here; `Method.apply` then casts the piece to its `param_dtype`
        factory = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
        if weight.device.type == "meta":
            if energy is not None:
                raise NotSupported(
                    "SVFit's energy-threshold ranks need the weights' singular values, and a meta-device backbone "
                    "has none; set a fixed r (or leave r and energy unset for the full spectrum) to count on meta"
                )
            r = min(rank or full, full)
            u, s, vh = (torch.empty(shape, **factory) for shape in ((out, r), (r,), (r, cols)))
        else:
            u, s, vh = _svd64(weight.reshape(out, cols))
            r = energy_rank(s, energy, energy_of) if energy is not None else full
            r = min(r, rank) if rank is not None else r
            u, s, vh = (t.to(**factory) for t in (u[:, :r], s[:r], vh[:r]))
        self.rank = r
        self.sigma = nn.Parameter(s.clone())
        self.register_derived("U", u.contiguous())
        self.register_derived("Vh", vh.contiguous())
        self.register_derived("sigma0", s.clone())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, out={self.U.shape[0]}, in={self.Vh.shape[1]}{', conv' if self.conv else ''}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U_r ((sigma - sigma0) * (V_r^T x)): the delta's output only (the frozen layer supplies W x)."""
        shift = self.sigma - self.sigma0
        if self.conv:
            down = self.Vh.view(self.rank, -1, *self.kernel)
            h = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
            return F.conv2d(h * shift.view(1, -1, 1, 1), self.U.view(*self.U.shape, 1, 1))
        return F.linear(F.linear(x, self.Vh) * shift, self.U)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U_r diag(sigma - sigma0) V_r^T in `dtype` (float64 for merging; the product's dtype for the fold), shaped
        like the matrix (out x in·kh·kw). The shift is taken in at least fp32, so a bf16 fold does not lose it to
        rounding sigma and sigma0 first."""
        wide = torch.promote_types(dtype, torch.float32)
        shift = (self.sigma.to(wide) - self.sigma0.to(wide)).to(dtype).unsqueeze(0)
        return (self.U.to(dtype) * shift) @ self.Vh.to(dtype)

    def derived_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.Vh, self.sigma0))


class SVFitDelta(AdapterModule):
    """SVFit on a Linear's or Conv2d's whole weight (`spectra["all"]`), or on named thirds (q / k / v) of
    a fused qkv linear, each third with its own SVD. Attached as an output hook: y + delta(x)."""

    def __init__(self, layer: nn.Module, parts: tuple[str, ...], r: int | None, energy: float | None,
                 energy_of: str):  # fmt: skip
        super().__init__()
        self.parts = parts
        spectrum = lambda w, **kw: Spectrum(w, r, energy, energy_of, **kw)
        if parts:
            rows = {p: layer.weight[part_rows(p, layer.out_features)] for p in parts}
            self.spectra = nn.ModuleDict({p: spectrum(w) for p, w in rows.items()})
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise NotSupported(
                    f"SVFit needs an ungrouped, zero-padded Conv2d (groups={layer.groups}, "
                    f"padding_mode={layer.padding_mode!r})"
                )
            geometry = {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
                        "dilation": layer.dilation}  # fmt: skip
            self.spectra = nn.ModuleDict({"all": spectrum(layer.weight, **geometry)})
        else:
            self.spectra = nn.ModuleDict({"all": spectrum(layer.weight)})

    def forward(self, y: torch.Tensor | nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if isinstance(y, nn.Module):  # attached with where="replace" on an nn.Linear: pick the cheaper route
            return self._linear(y, x)
        return self._add_delta(y, x)

    def _add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return y + self.spectra["all"](x)
        return add_to_parts(y, self.spectra, x)

    def _rows(self, part: str, out_features: int) -> slice:
        return slice(None) if part == "all" else part_rows(part, out_features)

    def folded_weight(self, weight: torch.Tensor, low_precision: torch.dtype | None = None) -> torch.Tensor:
        """W + U_r diag(sigma - sigma0) V_r^T in every adapted row block, as a new tensor. In the pieces' dtype
        (at least fp32) by default, outside autocast, so the delta is not rounded before it meets W; under
        autocast (`low_precision`, the dtype the product runs in) built in that dtype, which the product would
        round W' to anyway: its d^3-sized matmuls then run at the low-precision rate too."""
        dtype = low_precision or torch.promote_types(weight.dtype, next(iter(self.spectra.values())).sigma.dtype)
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            folded = weight.to(dtype, copy=True)
            for part, spectrum in self.spectra.items():
                folded[self._rows(part, folded.shape[0])] += spectrum.delta_weight(dtype)
        return folded

    def _linear(self, host: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        sigmas = [spectrum.sigma for spectrum in self.spectra.values()]
        training = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in sigmas))
        if host.weight.requires_grad or not fold_is_cheaper(self, tokens, training, x.requires_grad):
            return self._add_delta(type(host).forward(host, x), x)
        if not training:
            return F.linear(x, self.folded_weight(host.weight), host.bias)
        return _FoldedSpectra.apply(x, host.weight, host.bias, self, *sigmas)

    def _delta_weight(self, host: nn.Module) -> torch.Tensor:
        """The whole delta of the host's weight, float64, in the weight's shape."""
        if not self.parts:
            return self.spectra["all"].delta_weight().view(host.weight.shape).to(host.weight.device)
        return parts_delta_weight(host, {p: s.delta_weight for p, s in self.spectra.items()}, torch.float64)

    def merge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """W' = W + U_r diag(sigma - sigma0) V_r^T (computed in float64, written in the weight's dtype)."""
        return {"weight": (host.weight.double() + self._delta_weight(host)).to(host.weight.dtype)}

    def unmerge_updates(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": (host.weight.double() - self._delta_weight(host)).to(host.weight.dtype)}


def route_costs(delta: SVFitDelta, tokens: int, training: bool, input_grad: bool) -> dict[str, int]:
    """Multiply-adds one forward (and, `training`, its backward) adds to the frozen linear's own, per route:
    "delta" runs U_r ((sigma - sigma0) ⊙ (V_r^T x)) beside W x (2 N r (in + out) per part and pass: down and
    up, then their transposes for x's gradient); "fold" builds W' = W + delta once per pass (out r in per part,
    again in backward instead of keeping W') and runs one product with it, so x's gradient needs nothing more,
    and sigma's gradient sum_n (U_r^T g_n) ⊙ (V_r^T x_n) costs N r (in + out), or N out in + r out in through
    g^T x when that is less (the full spectrum on many tokens)."""
    delta_cost = fold_cost = 0
    for spectrum in delta.spectra.values():
        out, d_in, r = spectrum.U.shape[0], spectrum.Vh.shape[1], spectrum.rank
        thin = tokens * r * (d_in + out)
        if not training:
            delta_cost, fold_cost = delta_cost + thin, fold_cost + out * r * d_in
            continue
        delta_cost += thin * (2 if input_grad else 1)
        fold_cost += out * r * d_in * (2 if input_grad else 1) + min(thin, _outer_cost(tokens, out, d_in, r))
    return {"delta": delta_cost, "fold": fold_cost}


def _outer_cost(tokens: int, out: int, d_in: int, r: int) -> int:
    """Multiply-adds of sigma's gradient through g^T x: N out in for g^T x, then r out in for U_r^T (g^T x)."""
    return tokens * out * d_in + r * out * d_in


def fold_is_cheaper(delta: SVFitDelta, tokens: int, training: bool, input_grad: bool) -> bool:
    costs = route_costs(delta, tokens, training, input_grad)
    return costs["fold"] < costs["delta"]


class _FoldedSpectra(torch.autograd.Function):
    """y = x W'^T + b with W' = W + sum_parts U_r diag(sigma - sigma0) V_r^T: the frozen product and SVFit's
    delta in one matmul. Backward rebuilds W' (cheaper than keeping a weight-sized copy per layer) for x's
    gradient, and keeps for sigma's the smaller of x (N x in) and the projections V_r^T x (N x r per part)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta: SVFitDelta, *sigmas):
        flat = x.reshape(-1, x.shape[-1])
        ranks = sum(s.rank for s in delta.spectra.values())
        ctx.keep_input = flat.shape[-1] <= ranks
        if ctx.keep_input:
            kept = (flat,)
        else:  # V_r^T x per part: what sigma's gradient multiplies, r numbers a token instead of in
            kept = tuple(F.linear(flat, s.Vh.to(flat.dtype)) for s in delta.spectra.values())
        device = x.device.type
        ctx.low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.delta, ctx.x_shape = delta, x.shape
        ctx.save_for_backward(weight, *kept, *sigmas)
        return F.linear(x, delta.folded_weight(weight, ctx.low), bias)

    @staticmethod
    def backward(ctx, grad):
        delta = ctx.delta
        weight, *rest = ctx.saved_tensors
        kept = rest[: len(rest) - len(delta.spectra)]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ delta.folded_weight(weight, ctx.low).to(g.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_sigmas = []
        for i, (part, spectrum) in enumerate(delta.spectra.items()):
            if not ctx.needs_input_grad[4 + i]:
                grad_sigmas.append(None)
                continue
            g_part = g[:, delta._rows(part, g.shape[-1])]
            n, out, d_in, r = g.shape[0], spectrum.U.shape[0], spectrum.Vh.shape[1], spectrum.rank
            if ctx.keep_input and _outer_cost(n, out, d_in, r) < n * r * (d_in + out):
                work = ctx.low or torch.float32  # g^T x (out x in), then U^T (g^T x): d^3 at the product's rate
                outer = g_part.t().to(work) @ kept[0].to(work)
                grad_sigmas.append(((spectrum.U.t().to(work) @ outer).float() * spectrum.Vh.float()).sum(1))
                continue
            projected = F.linear(kept[0], spectrum.Vh.to(kept[0].dtype)) if ctx.keep_input else kept[i]
            back = g_part @ spectrum.U.to(g.dtype)
            grad_sigmas.append((back.float() * projected.float()).sum(0))
        return (grad_x, None, grad_bias, None, *grad_sigmas)


def _spectra(backbone: nn.Module) -> Iterator[tuple[str, Spectrum]]:
    for name, module in adapter_modules(backbone):
        if isinstance(module, Spectrum):
            yield name, module


def svfit_ranks(backbone: nn.Module) -> dict[str, int]:
    """Per adapted matrix (`<layer>.svfit.spectra.<all|q|k|v>`), the number of singular values that train."""
    return {name: s.rank for name, s in _spectra(backbone)}


def derived_state_bytes(backbone: nn.Module) -> int:
    """Bytes of SVFit's derived state (U_r, V_r, sigma0 of every adapted matrix) held in memory beside the
    backbone: r (out + in·kh·kw + 1) elements per matrix, in the pieces' dtype. None of it is in the adapter
    file, and a merged-and-unloaded model drops it."""
    return sum(s.derived_bytes() for _, s in _spectra(backbone))


def _pattern(target: str) -> str:
    return _parse(target)[0]


def _parse(target: str) -> tuple[str, tuple[str, ...]]:
    return parse_fused_target(target, "SVFit")


@register_method
@dataclass
class SVFit(Method):
    """SVFit: the singular values of frozen weights train. For each targeted W = U S V^T the top-r
    singular values sigma train; U_r and V_r stay frozen. A Conv2d's kernel is decomposed as the
    out x (in·kh·kw) matrix and applied exactly as a k×k convolution by V_r^T then a 1×1 one by U_r.

    The paper's description (no official code exists) and mmpeft's reading of it: the paper splits
    W = W_r + W_e, freezes W_e and the singular vectors, and trains Sigma_r, initialised to the top-r
    singular values, so W' = W at init. mmpeft computes the same function in delta form,
    y = W x + U_r ((sigma - sigma0) ⊙ (V_r^T x)), which keeps no second copy of W (no W_e buffer) and is
    exactly the frozen layer at init (sigma = sigma0 bit for bit, so the delta is exactly zero). sigma holds
    the absolute singular values, as in the paper; sigma0 (the initial singular values), U_r and V_r are
    derived state: recomputed from the frozen weight when the method is applied (a float64 SVD on the
    weight's device, stored in the pieces' dtype), never written to the adapter file, which holds only the
    trained sigma and the method config. Only the products u_i v_i^T enter the delta, and those do not
    depend on the SVD's sign convention, so a reload needs no fixed signs; on the same machine and software
    it reproduces the outputs bit for bit. Cost: r (out + in + 1) derived numbers per matrix in memory
    (`derived_state_bytes`), and per forward until merged one of two routes, whichever costs fewer multiply-adds
    (`route_costs`): the delta beside W x (2 N r (in + out) per part and pass), or W' = W + delta folded into the
    one product (out r in to build it, again in backward; sigma's gradient N r (in + out), or N out in + r out in
    through g^T x). Folding wins once the tokens outnumber the width: a ViT-B batch folds at every rank. Under
    autocast W' is built in the autocast dtype, which the product rounds it to anyway.
    Keeps for backward, per adapted linear, the smaller of x [N, in] and V_r^T x per part [N, r], because sigma's
    gradient is sum_n (U_r^T g_n) ⊙ (V_r^T x_n); nothing else (U_r, V_r are buffers, W' is rebuilt). That is
    LoRA's cost at the same rank or below: LoRA keeps x and A x, and adds its A, B gradient products.

    Rank: `r` fixed (capped at min(out, in); unset: the full spectrum), or per matrix by `energy`: the
    smallest r with sum_{i<=r} sigma_i^2 / sum_i sigma_i^2 >= energy (`energy_of="sq"`; `"sum"` uses
    sigma_i instead of sigma_i^2; `r`, if also set, caps it). The paper keeps the singular values that
    "capture over 99% of the matrix's information" per matrix without a formula, so whether it means
    sigma or sigma^2 is open: the `paper` preset uses energy 0.99 on sigma^2 (the Frobenius energy of the
    best rank-r approximation). The SVD needs real weights, so on the meta device only a fixed r counts.

    Targets are module-name patterns with globs, each must match; a fused qkv takes a trailing `[q,v]`
    as with LoRA (each third gets its own SVD). Unset, the family's default: token backbones
    `attn.qkv[q,v]` (LoRA's default matrices: the full spectrum is d per matrix against LoRA-r8's 16 d,
    the paper's "16 times fewer"); UNets and DiTs `to_q, to_k, to_v, to_out.0` (plus `add_k_proj,
    add_v_proj` where present): 93,696 on SD1.5's 128 attention linears at full spectrum. Merge folds
    U_r diag(sigma - sigma0) V_r^T into the weight (float64, written in the weight's dtype); unmerge
    subtracts it. sigma is 1-D, so it is exempt from weight decay.
    """

    name: ClassVar[str] = "svfit"
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    presets: ClassVar[dict] = {"paper": {"r": None, "energy": 0.99, "energy_of": "sq"}}

    r: int | None = field(
        default=None,
        metadata={
            "help": (
                "singular values trained per matrix (capped at min(out, in·kh·kw)); unset: the full spectrum; with "
                "energy set it caps the energy rank"
            )
        },
    )  # None: the full spectrum min(out, in·kh·kw)
    energy: float | None = field(
        default=None,
        metadata={
            "help": (
                "per matrix, the smallest r whose top-r singular values hold this share (0, 1] of the spectrum's "
                "energy (see energy_of); unset: r decides; needs real weights (not meta)"
            )
        },
    )
    energy_of: str = field(
        default="sq",
        metadata={"help": "what the energy threshold sums: sq (sigma^2, the Frobenius energy) or sum (sigma)"},
    )
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": LINEAR_TARGETS_HELP},
    )  # None: the backbone family's default (see the docstring)

    def __post_init__(self) -> None:
        if self.r is not None and self.r < 1:
            raise ValueError(f"SVFit r must be positive (or unset for the full spectrum), got {self.r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"SVFit energy is a share in (0, 1], got {self.energy}")
        if self.energy_of not in ENERGY_OF:
            raise ValueError(f"SVFit energy_of must be one of {ENERGY_OF}, got {self.energy_of!r}")

    def inject(self, backbone: nn.Module) -> None:
        for target, name, module in select_modules(backbone, "SVFit", self.targets, DEFAULT_TARGETS, _pattern):
            parts = _parse(target)[1]
            if not isinstance(module, nn.Linear | nn.Conv2d):
                raise NotSupported(
                    f"SVFit target {name!r} is a {type(module).__name__}; SVFit supports nn.Linear and nn.Conv2d"
                )
            if parts and not (isinstance(module, nn.Linear) and module.out_features % 3 == 0):
                raise NotSupported(f"SVFit parts {parts} need a fused qkv linear; {name!r} is not one")
            piece = SVFitDelta(module, parts, self.r, self.energy, self.energy_of)
            attach(module, "svfit", piece, where="replace" if type(module) is nn.Linear else "output")
