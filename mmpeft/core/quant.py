"""Uniform affine quantizers with learnable steps, as EfficientDM trains them (He et al., "EfficientDM: Efficient
Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models", ICLR 2024, arXiv 2310.03270; ThisisBillhe/EfficientDM
`quant_scripts/quant_layer.py`), written for any layer that quantizes its weights or inputs.

- Fake quantization: q = clamp(round_ste(x / s) + z, 0, 2^b - 1), x_hat = (q - z) * s. Rounding passes gradients
  straight through; the clamp is written x + relu(lo - x) - relu(x - hi), so gradients reach s and z (LSQ-style,
  without LSQ's gradient-scale factor: EfficientDM sets small per-group learning rates instead).
- `WeightQuantizer`: per output channel, asymmetric, integers in [0, 2^b - 1]; the step is learnable and the zero
  point fixed (a buffer); initialised by min/max with each channel's range widened to include 0.
- `ActivationQuantizer`: per tensor, asymmetric, a table of learnable (step, zero point) pairs, one per denoising
  step of a schedule (EfficientDM's TALSQ). The entry is chosen by the forward context's `step` (the sampler's
  index), never an internal counter, so classifier-free guidance may run batched or as two calls; with `step` unset
  (training on random timesteps) each sample takes the entry whose timestep is nearest its own; a forward with
  neither is refused. Initialised by an L_p (p = 2.4) search over 80 shrinkages of [min, max] (LAPQ), every entry
  from the same calibrated value (`calibrate`, or the first forward inside `observing`; an uncalibrated quantizer
  refuses to run rather than quantize on the placeholder grid). `resample` fits a table to a sampling schedule with
  fewer steps for good; `use_schedule` lets a sampler with another schedule read the trained table without
  changing it (its step index i takes the entry of its own i-th timestep).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.context import ForwardContext

__all__ = [
    "round_ste",
    "fake_quantize",
    "quantize_to_int",
    "minmax_params",
    "lp_search_params",
    "WeightQuantizer",
    "ActivationQuantizer",
    "RESAMPLE_MODES",
    "pack_ints",
    "unpack_ints",
]

RESAMPLE_MODES = ("stride", "interpolate")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward, the identity in the backward (straight-through)."""
    return (x.round() - x).detach() + x


def _clamp_through(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp(x, low, high) whose gradient still reaches what x was made of (the official `clipping`)."""
    return x + F.relu(low - x) - F.relu(x - high)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantized value of x on the (step, zero point) grid of `bits` bits; differentiable in x, step and zero
    point (straight-through rounding, pass-through clamp)."""
    q = _clamp_through(round_ste(x / step) + zero_point, 0.0, 2.0**bits - 1)
    return (q - zero_point) * step


def quantize_to_int(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers [0, 2^b - 1] of x on the grid (what an export stores), as uint8."""
    return torch.clamp(torch.round(x / step) + torch.round(zero_point), 0, 2**bits - 1).to(torch.uint8)


def minmax_params(x: torch.Tensor, bits: int, dim: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point) from the min and max of x, the range widened to include 0; per slice along `dim` (the
    output channels of a weight), shaped to broadcast against x, or per tensor when `dim` is None."""
    if dim is None:
        low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    else:
        flat = x.detach().transpose(0, dim).reshape(x.shape[dim], -1)
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        low, high = flat.min(dim=1).values.clamp(max=0).view(shape), flat.max(dim=1).values.clamp(min=0).view(shape)
    step = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    return step.detach(), torch.round(-low / step).detach()


@torch.no_grad()
def lp_search_params(
    x: torch.Tensor, bits: int, p: float = 2.4, candidates: int = 80
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (step, zero point) minimising mean |x - x_hat|^p over [min, max] shrunk by 1 - 0.01 i,
    i < `candidates` (LAPQ's L_p criterion, p = 2.4, as EfficientDM calibrates activations); the candidates are
    scored a chunk at a time in one broadcast (the first of equal scores wins, as a loop over them would pick)."""
    flat = x.detach().reshape(1, -1)
    shrink = 1.0 - 0.01 * torch.arange(candidates, dtype=flat.dtype, device=flat.device)
    low, high = flat.min() * shrink, flat.max() * shrink
    steps = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    zeros = torch.round(-low / steps)
    chunk = max(1, (1 << 20) // max(flat.shape[1], 1))  # about 1M elements a broadcast (memory-bound beyond)
    scores = []
    for i in range(0, candidates, chunk):
        s, z = steps[i : i + chunk, None], zeros[i : i + chunk, None]
        q = (torch.clamp(torch.round(flat / s) + z, 0, 2**bits - 1) - z) * s
        scores.append((flat - q).abs().pow(p).mean(dim=1))
    best = int(torch.argmin(torch.cat(scores)))
    return steps[best].clone(), zeros[best].clone()


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric fake quantization of a weight [C_out, ...] with a learnable step and a fixed
    zero point; `initialise(weight)` sets both from the weight's per-channel min / max (0 included)."""

    def __init__(self, shape: tuple[int, ...], bits: int, device: torch.device | None = None,
                 trainable: bool = True):  # fmt: skip
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be in 2..8, got {bits}")
        self.bits = bits
        broadcast = (shape[0],) + (1,) * (len(shape) - 1)
        # a frozen quantizer's step is derived from the weight like its zero point (never stored)
        _tensor(self, "step", torch.ones(broadcast, device=device), trainable, persistent=False)
        # derived from the weight by `initialise` (EfficientDM never trains it), so never stored with the step
        self.register_buffer("zero_point", torch.zeros(broadcast, device=device), persistent=False)

    @torch.no_grad()
    def initialise(self, weight: torch.Tensor) -> None:
        step, zero = minmax_params(weight, self.bits, dim=0)
        self.step.copy_(step)
        self.zero_point.copy_(zero)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.step, self.zero_point, self.bits)

    def integers(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize_to_int(weight, self.step, self.zero_point, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.step.shape[0]}"


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantization of a layer's input with one learnable (step, zero point) pair per step
    of a denoising schedule (see the module docstring).

    Args:
        bits: 2..8.
        timesteps: the schedule's timesteps in sampling order (entry i belongs to step index i); one entry (the
            default) gives a plain per-tensor quantizer.
    """

    def __init__(self, bits: int, timesteps: torch.Tensor | list[int] | None = None,
                 device: torch.device | None = None, trainable: bool = True):  # fmt: skip
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be in 2..8, got {bits}")
        self.bits = bits
        steps = torch.as_tensor(timesteps if timesteps is not None else [0], dtype=torch.float32, device=device)
        self.register_buffer("timesteps", steps.reshape(-1))
        self.trainable = trainable  # frozen (a layer kept at its PTQ values): the tables are saved buffers
        _tensor(self, "step", torch.ones(len(self.timesteps), device=device), trainable)
        _tensor(self, "zero_point", torch.zeros(len(self.timesteps), device=device), trainable)
        self.register_buffer("calibrated", torch.tensor(False, device=device))  # saved: a loaded table is calibrated
        self.observing = False  # calibrate on the next forward's input (the PTQ pass)
        self._ready = False  # seen calibrated (a calibrated table never goes back)
        self.schedule: tuple[torch.Tensor, str] | None = None  # a sampler's own timesteps and how to read the table

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, p: float = 2.4) -> None:
        """Every entry from the L_p search on x (EfficientDM starts all steps from one PTQ value)."""
        step, zero = lp_search_params(x.detach().float(), self.bits, p)
        self.step.fill_(float(step))
        self.zero_point.fill_(float(zero))
        self.calibrated.fill_(True)

    def use_schedule(self, timesteps: torch.Tensor | list[int] | None, mode: str = "interpolate") -> None:
        """Read the trained table through a sampler's own schedule: its step index i takes the entry at its i-th
        timestep ("interpolate": linearly between the trained entries of the nearest timesteps; "stride": the
        trained entry k·i, when the schedule is the trained one strided). The table itself is unchanged (a sampler
        used while training leaves the parameters the optimizer holds in place); None: the trained schedule."""
        if timesteps is None:
            self.schedule = None
            return
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        new = torch.as_tensor(timesteps, dtype=torch.float32, device=self.timesteps.device).reshape(-1)
        if len(new) == self.num_steps and torch.equal(new, self.timesteps):
            self.schedule = None
            return
        if mode == "stride":
            _stride_of(self.timesteps, new)  # refuses a schedule that is not the trained one strided
        self.schedule = (new, mode)
        self._order = torch.argsort(self.timesteps)  # the trained timesteps ascending, once per schedule

    def _entries(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point) of the sampler's step `idx` under `use_schedule`."""
        new, mode = self.schedule
        if mode == "stride":
            k = _stride_of(self.timesteps, new)
            return self.step[idx * k], self.zero_point[idx * k]
        order = self._order
        t = new[idx : idx + 1]
        xp = self.timesteps[order]
        return _interp(t, xp, self.step[order])[0], _interp(t, xp, self.zero_point[order])[0]

    def index(self, ctx: ForwardContext | None, batch: int) -> torch.Tensor | int:
        """The table entry of this forward: `ctx.step`, else per sample the entry nearest `ctx.timestep`."""
        if self.num_steps == 1:
            return 0
        if ctx is not None and ctx.step is not None:
            steps = self.num_steps if self.schedule is None else len(self.schedule[0])
            if not 0 <= ctx.step < steps:
                raise IndexError(f"sampler step {ctx.step} is outside this quantizer's {self.num_steps}-step table; "
                                 "resample the tables to the sampling schedule first (`resample`)")  # fmt: skip
            return int(ctx.step)
        if ctx is None or ctx.timestep is None:
            raise ValueError(
                "a per-step activation quantizer needs the denoising step of this forward: the sampler's step index "
                "(BackboneInput.step) or the timestep (BackboneInput.timestep); this forward has neither"
            )
        t = torch.as_tensor(ctx.timestep, device=self.timesteps.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        return (t.unsqueeze(1) - self.timesteps.unsqueeze(0)).abs().argmin(dim=1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        if not self._ready and not bool(self.calibrated):  # `_ready`: no host sync per forward once calibrated
            if not self.observing:
                raise RuntimeError(
                    "this activation quantizer has no calibrated range yet: calibrate it first (EfficientDM's "
                    "`calibrate` runs the full-precision model's own trajectory once; a loaded adapter file carries "
                    "the trained tables)"
                )
            self.calibrate(x)
        self._ready = True
        idx = self.index(ctx, x.shape[0])
        if isinstance(idx, int) and self.schedule is not None:
            step, zero = self._entries(idx)
        else:
            step, zero = self.step[idx], self.zero_point[idx]
        if isinstance(idx, torch.Tensor):  # one entry per sample, broadcast over the rest
            shape = (-1,) + (1,) * (x.dim() - 1)
            step, zero = step.view(shape), zero.view(shape)
        return fake_quantize(x, step.to(x.dtype), zero.to(x.dtype), self.bits)

    @torch.no_grad()
    def resample(self, timesteps: torch.Tensor | list[int], mode: str = "interpolate") -> None:
        """Fit the tables to a sampling schedule of fewer steps. "interpolate" (the paper's description and the
        default: each new timestep's (step, zero point) linearly interpolated between the trained entries of the
        nearest timesteps, valid for any schedule) or "stride" (the released code: keep every k-th entry, only
        when the new schedule is the old one strided, k = old / new)."""
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        new = torch.as_tensor(timesteps, dtype=torch.float32, device=self.timesteps.device).reshape(-1)
        if mode == "stride":
            stride = _stride_of(self.timesteps, new)
            steps, zeros = self.step[::stride], self.zero_point[::stride]
        else:
            order = torch.argsort(self.timesteps)
            steps = _interp(new, self.timesteps[order], self.step[order])
            zeros = _interp(new, self.timesteps[order], self.zero_point[order])
        self.timesteps = new
        del self.step, self.zero_point
        _tensor(self, "step", steps.clone(), self.trainable)
        _tensor(self, "zero_point", zeros.clone(), self.trainable)
        self.schedule = None

    @torch.no_grad()
    def set_timesteps(self, timesteps: torch.Tensor | list[int]) -> None:
        """Name the schedule the table's entries belong to (same length); for a table not trained yet, whose
        entries are all the calibrated value (a table that has trained is resampled instead: `resample`)."""
        new = torch.as_tensor(timesteps, dtype=torch.float32, device=self.timesteps.device).reshape(-1)
        if len(new) != self.num_steps:
            raise ValueError(f"this table has {self.num_steps} entries; got a schedule of {len(new)} timesteps")
        self.timesteps.copy_(new)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, steps={self.num_steps}"


def _tensor(module: nn.Module, name: str, value: torch.Tensor, trainable: bool, persistent: bool = True) -> None:
    """`value` as a parameter (trainable) or a buffer (frozen; saved unless not `persistent`)."""
    if trainable:
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value, persistent=persistent)


def _stride_of(trained: torch.Tensor, new: torch.Tensor) -> int:
    """k such that `new` is `trained[::k]`, else a ValueError naming the fix."""
    stride = len(trained) // max(len(new), 1)
    if stride < 1 or len(trained) % len(new) or not torch.equal(trained[::stride], new):
        raise ValueError(
            f"'stride' keeps every k-th of the {len(trained)} trained entries, so the new schedule must be the "
            "trained one strided; use mode='interpolate' for any other schedule"
        )
    return stride


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp in torch: piecewise-linear through (xp, fp), xp increasing, constant beyond the ends."""
    if len(xp) == 1:
        return fp.expand(len(x)).clone()
    right = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]), right=True).clamp(1, len(xp) - 1)
    left = right - 1
    w = ((x.clamp(xp[0], xp[-1]) - xp[left]) / (xp[right] - xp[left])).clamp(0, 1)
    return fp[left] * (1 - w) + fp[right] * w


def pack_ints(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [0, 2^b - 1] (b in 2, 4, 8) packed 8 / b to a byte along the first axis (padded with zeros), as uint8:
    two 4-bit values per byte, the first in the low nibble."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packing takes 2, 4 or 8 bits, got {bits}")
    values = values.to(torch.uint8)
    per_byte = 8 // bits
    rows = values.shape[0]
    pad = (-rows) % per_byte
    if pad:
        values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    grouped = values.reshape(-1, per_byte, *values.shape[1:])
    out = torch.zeros_like(grouped[:, 0])
    for i in range(per_byte):
        out |= grouped[:, i] << (bits * i)
    return out


def unpack_ints(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """`pack_ints` undone: the first `rows` integers along the first axis."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packing takes 2, 4 or 8 bits, got {bits}")
    per_byte, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1, *packed.shape[1:])[:rows]
