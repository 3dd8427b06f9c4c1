"""EfficientDM's deployable form: the quantized denoiser as one safetensors file of integers, and its loader.

`export_int(model, path)` writes, per QALoRA layer, the weight integers with B A folded in once (`integers()`),
packed along the output channels (`pack_ints`: two 4-bit values a byte; 3-bit weights take 4-bit slots and 5..7-bit
ones a byte), the per-channel step and zero point, the bias and the activation table (step, zero point and
timesteps per denoising step; the bits in the header). Every other backbone tensor (norms, embeddings, the convs
EfficientDM keeps in floating point) is stored in its own dtype; the float weights the integers replace are not.
The header holds the format tag, the method config, the backbone signature and the bits of every layer.

`load_int_model(path, backbone)` rebuilds the model on a freshly built backbone of the same architecture (its own
weights are never read: the file holds everything). Each quantized layer computes through an `IntLayer`
(y = op(Q_a(x; s_x[step]), W, b)) under an unregistered `IntModel` method, so the backbone's forward context (the
sampler's step) reaches the activation tables and `use_schedule` works as on the trained model. Two ways to run
the weights (`mode`):

- "dequantize": W = (W_int - z_w) s_w computed once at load, in float32, and the inputs fake-quantized with the
  same arithmetic as `fake_quantize` (in place, without its straight-through terms): the same function as the
  fake-quantized trained model, bit for bit.
- "int": every linear (any weight / input bits up to 8) runs an integer matmul, `torch._int_mm` (int8 x int8 ->
  int32; it runs on CPU, where torchao is not installed and `_weight_int8pack_mm` keeps float inputs): the input
  is quantized to its uint8 integers with the table entry of this step, both operands are shifted into int8
  (inputs by 128; weights by their zero point when they have at most 7 bits, else by 128), the shifts are undone
  with exact integer correction terms (row sums of the inputs, column sums of the weights) and the sum is scaled
  by s_x s_w once. Exact in the integers; each layer's float result differs from the fake-quantized one by float32
  rounding only, which across a network may move a later layer's input across a rounding boundary (one
  activation step there). An activation zero point that training moved off the integers is rounded, as an
  integer kernel needs (the grids then differ only at their clamped ends). Convolutions run dequantized (an
  integer convolution would need im2col). Timings: `python -m mmpeft.lab.int_bench`.

The hosts' float weights and biases are released after loading (zero-stride views of their shapes, so the
backbone's signature is unchanged): the loaded model is for inference, and `unload` and `disabled()` refuse.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mmpeft.core.errors import AdapterMismatch, NotMergeable, NotSupported, OutputExists
from mmpeft.core.inject import attach, placements
from mmpeft.core.method import Method
from mmpeft.core.model import PeftModel, backbone_signature
from mmpeft.core.modules import AdapterModule, adapter_modules
from mmpeft.core.quant import RESAMPLE_MODES, ActivationQuantizer, pack_ints, unpack_ints
from mmpeft.core.state import NonFiniteTensors, non_finite, read_safetensors
from mmpeft.methods.qalora import QALoRALayer
from mmpeft.version import __version__

__all__ = ["FORMAT", "MODES", "IntLayer", "IntModel", "LayerRecord", "export_int", "load_int_model", "int_mm_works"]

FORMAT = "mmpeft-int/1"
MODES = ("dequantize", "int")
_LAYER = "layers."  # file keys of the quantized layers: layers.<host name>.<field>
_OTHER = "backbone."  # file keys of every other backbone tensor: backbone.<state-dict key>
_FIELDS = ("weight", "weight_step", "weight_zero", "bias", "input_step", "input_zero", "input_timesteps")


# -- the file ------------------------------------------------------------------------------------------------------
def _packed_bits(bits: int) -> int:
    """The slot width `pack_ints` stores `bits`-bit integers in (2, 4 or 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass
class LayerRecord:
    """One quantized layer as the file holds it (`tensors` keyed by `_FIELDS`; "bias" absent without one)."""

    kind: str  # "linear" | "conv2d"
    weight_shape: list[int]
    w_bits: int
    a_bits: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def packed_bits(self) -> int:
        return _packed_bits(self.w_bits)

    def integers(self) -> torch.Tensor:
        """The weight's integers [0, 2^b - 1] (uint8), in the weight's shape."""
        return unpack_ints(self.tensors["weight"], self.packed_bits, self.weight_shape[0])

    def header(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight_shape": self.weight_shape, "w_bits": self.w_bits, "a_bits": self.a_bits,
                "packed_bits": self.packed_bits}  # fmt: skip


def _record(host: nn.Module, piece: QALoRALayer) -> LayerRecord:
    """A trained QALoRA layer as integers: B A folded in and quantized once (`QALoRALayer.integers`)."""
    ints, step, zero = piece.integers()
    aq = piece.a_quant
    tensors = {
        "weight": pack_ints(ints, _packed_bits(piece.w_bits)),
        "weight_step": step.reshape(-1).float(),
        "weight_zero": zero.reshape(-1).float(),
        "input_step": aq.step.detach().float(),
        "input_zero": aq.zero_point.detach().float(),
        "input_timesteps": aq.timesteps.detach().float(),
    }
    if host.bias is not None:
        tensors["bias"] = host.bias.detach()
    kind = "conv2d" if piece.is_conv else "linear"
    return LayerRecord(kind, list(ints.shape), piece.w_bits, aq.bits, tensors)


def _check_exportable(model: PeftModel) -> None:
    if model.method.name != "efficientdm":
        raise NotSupported(
            f"the integer export writes an EfficientDM model (its QALoRA layers' integers); this model's method is "
            f"{model.method.name!r}"
        )
    if not model.method.calibrated(model.backbone):
        raise NotSupported(
            "this EfficientDM model's activation quantizers are not calibrated, so it has no integer form yet: "
            "calibrate it first (EfficientDM.calibrate(backbone, inputs, timesteps), or train / load an adapter)"
        )


def _contents(model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, LayerRecord]]:
    """(file tensors, layer records) of an EfficientDM model."""
    backbone = model.backbone
    records = {p.host_name: _record(p.host, p.child) for p in placements(backbone) if isinstance(p.child, QALoRALayer)}
    pieces = tuple(prefix + "." for prefix, _ in adapter_modules(backbone))
    replaced = {f"{name}.{t}" for name in records for t in ("weight", "bias")}
    tensors = {
        _OTHER + k: v for k, v in backbone.state_dict().items() if k not in replaced and not k.startswith(pieces)
    }
    for name, record in records.items():
        tensors.update({f"{_LAYER}{name}.{k}": v for k, v in record.tensors.items()})
    # own storage per tensor: safetensors refuses tensors that share memory
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, records


def export_int(model: PeftModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a trained (or calibrated) EfficientDM model's denoiser as one integer safetensors file (see the module
    docstring); written atomically, an existing file replaced only with `overwrite`. Returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{str(path)!r} exists; pass overwrite=True to replace it")
    _check_exportable(model)
    tensors, records = _contents(model)
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteTensors(f"not writing {str(path)!r}: {len(bad)} tensors hold NaN or inf (e.g. {bad[:3]})")
    meta = {
        "format": FORMAT,
        "mmpeft_version": __version__,
        "method": json.dumps({"name": model.method.name, "config": model.method.config()}),
        "backbone": json.dumps(backbone_signature(model.backbone)),
        "layers": json.dumps({name: r.header() for name, r in records.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_int_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, LayerRecord], dict[str, torch.Tensor]]:
    """(header, layer records, other backbone tensors) of an integer export."""
    path = Path(path)
    raw, tensors = read_safetensors(path, "integer export")
    if raw.get("format") != FORMAT:
        raise AdapterMismatch(f"{str(path)!r} is not an mmpeft integer export (format {raw.get('format')!r})")
    try:
        header = {k: json.loads(raw[k]) for k in ("method", "backbone", "layers")}
    except (KeyError, json.JSONDecodeError) as err:
        raise AdapterMismatch(f"integer export {str(path)!r} has a damaged header ({err!r}); write it again") from err
    records = {}
    for name, info in header["layers"].items():
        own = {k: tensors.pop(f"{_LAYER}{name}.{k}") for k in _FIELDS if f"{_LAYER}{name}.{k}" in tensors}
        records[name] = LayerRecord(info["kind"], info["weight_shape"], info["w_bits"], info["a_bits"], own)
    others = {k.removeprefix(_OTHER): v for k, v in tensors.items() if k.startswith(_OTHER)}
    return header, records, others


# -- the integer matmul --------------------------------------------------------------------------------------------
@cache
def int_mm_works() -> bool:
    """Whether `torch._int_mm` (int8 x int8 -> int32) runs on this build's CPU, exactly."""
    a = torch.tensor([[-128, 127, 3]] * 2, dtype=torch.int8)
    b = torch.tensor([[127], [-128], [5]], dtype=torch.int8)
    try:
        return bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _table_entry(aq: ActivationQuantizer, ctx: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point) `aq` quantizes this forward with: 0-d, or [batch] when each sample takes its own."""
    idx = aq.index(ctx, batch)
    if isinstance(idx, int) and aq.schedule is not None:
        return aq._entries(idx)
    return aq.step[idx], aq.zero_point[idx]


def _input_grid(layer: IntLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point) of this forward's input, 0-d or [B, 1, ...] (one entry per sample), in x's dtype."""
    step, zero = _table_entry(layer.a_quant, layer.context, x.shape[0])
    step, zero = step.to(x.dtype), zero.to(x.dtype)
    if step.dim():
        shape = (-1,) + (1,) * (x.dim() - 1)
        step, zero = step.view(shape), zero.view(shape)
    return step, zero


def _fake_quantize_input(x: torch.Tensor, layer: IntLayer) -> torch.Tensor:
    """`ActivationQuantizer.forward` for inference: `fake_quantize`'s value in five in-place passes instead of its
    twelve differentiable ones (straight-through rounding and the pass-through clamp are exact in the forward)."""
    step, zero = _input_grid(layer, x)
    high = 2**layer.a_quant.bits - 1
    return torch.div(x, step).round_().add_(zero).clamp_(0, high).sub_(zero).mul_(step)


def _int_linear(x: torch.Tensor, layer: IntLayer) -> torch.Tensor:
    """y = s_x s_w sum_k (q_x - z_x)(q_w - z_w) + b, the sum in int32 (see the module docstring)."""
    step, zero = _input_grid(layer, x)
    zero = zero.round()  # an integer kernel's zero point (a trained one may have moved off the integers)
    # fake_quantize's integers q = clamp(round(x / s) + z, 0, 2^b - 1), shifted by -128 into int8, in place
    q = torch.div(x, step).round_().add_(zero - 128).clamp_(-128, 2**layer.a_quant.bits - 129)
    a = q.to(torch.int8).reshape(-1, x.shape[-1])
    acc = torch._int_mm(a, layer.weight_int8.t()).float()  # [rows, out]
    if layer.weight_shift is not None:  # 8-bit weights were shifted by 128: add back shift_c * sum_k a
        acc.addr_(a.sum(dim=1, dtype=torch.int32).float(), layer.weight_shift)
    shift = 128 - zero  # the inputs' shift to undo: (q_x - z_x) = a + (128 - z_x)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight_scale)
    if not step.dim():  # one scale for the batch: bias and shift fold into one vector, one fused op
        out = torch.addcmul(bias + step * shift * layer.weight_colsum_scaled, acc, step * layer.weight_scale)
    else:
        rows = x.numel() // x.shape[-1] // x.shape[0]
        row_step, row_shift = step.reshape(-1).repeat_interleave(rows), shift.reshape(-1).repeat_interleave(rows)
        out = (acc + row_shift[:, None] * layer.weight_colsum) * (row_step[:, None] * layer.weight_scale) + bias
    return out.view(*x.shape[:-1], -1)


# -- the layer and the method ----------------------------------------------------------------------------------
class IntLayer(AdapterModule):
    """A quantized layer loaded from an integer export, attached to its host with `where="replace"`:
    y = op(Q_a(x; s_x[step]), W, b), the activation table read from the forward context's step as in training.

    Args:
        host: the fresh backbone's nn.Linear / nn.Conv2d (its own weights are not read: only its conv geometry).
        record: the layer from the file.
        mode: "dequantize" (W in float32, computed once) or "int" (linears through `torch._int_mm`; convolutions
            dequantized).
    """

    def __init__(self, host: nn.Module, record: LayerRecord, mode: str = "dequantize"):
        super().__init__()
        self.is_conv = record.kind == "conv2d"
        if self.is_conv:
            self.conv = {"stride": host.stride, "padding": host.padding, "dilation": host.dilation,
                         "groups": host.groups}  # fmt: skip
        self.w_bits, self.mode = record.w_bits, mode
        t = record.tensors
        self.a_quant = ActivationQuantizer(record.a_bits, t["input_timesteps"], trainable=False)
        with torch.no_grad():
            self.a_quant.step.copy_(t["input_step"])
            self.a_quant.zero_point.copy_(t["input_zero"])
            self.a_quant.calibrated.fill_(True)
        self.register_derived("bias", t["bias"].float() if "bias" in t else None)
        ints, step, zero = record.integers(), t["weight_step"], t["weight_zero"]
        self.int_path = mode == "int" and not self.is_conv
        if self.int_path:
            self._build_int(ints, step, zero)
        else:
            shape = (-1,) + (1,) * (ints.dim() - 1)
            self.register_derived("weight", (ints.float() - zero.view(shape)) * step.view(shape))

    def _build_int(self, ints: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> None:
        """int8 weights (shifted by their zero point when that fits, else by 128) and the correction terms."""
        centred = ints.int() - zero.round().int()[:, None]  # q_w - z_w, in [-(2^b - 1), 2^b - 1]
        fits = self.w_bits <= 7
        shifted = centred if fits else ints.int() - 128
        self.register_derived("weight_int8", shifted.to(torch.int8).contiguous())  # [out, in]
        self.register_derived("weight_shift", None if fits else (128 - zero.round()).float())
        self.register_derived("weight_scale", step.float())
        colsum = centred.sum(dim=1).float()  # sum_k (q_w - z_w): multiplies the inputs' shift
        self.register_derived("weight_colsum", colsum)
        self.register_derived("weight_colsum_scaled", colsum * step.float())

    def forward(self, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.int_path:
            return _int_linear(x, self)
        x = _fake_quantize_input(x, self)
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.is_conv:
            return F.conv2d(x, weight, bias, **self.conv)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        path = "int8 matmul" if self.int_path else "dequantized"
        return f"w_bits={self.w_bits}, a_bits={self.a_quant.bits}, {path}"


@dataclass
class IntModel(Method):
    """The method of a loaded integer export: attaches one `IntLayer` per quantized layer from the file's records
    (set by `load_int_model` before the method is applied). Not registered: it is no trainable method, only the
    carrier that lets the backbone's forward context reach the loaded layers."""

    name: ClassVar[str] = "efficientdm_int"
    identity_at_init: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    needs_denoiser: ClassVar[bool] = True
    no_pristine: ClassVar[str] = (
        "a loaded integer export has released its float weights, so there is no full-precision model to switch "
        "back to; build the model from the run's config and adapter file for the teacher"
    )

    mode: str = field(default="dequantize", metadata={"help": "dequantize | int (linears through torch._int_mm)"})
    resample: str = field(default="interpolate", metadata={"help": "how a sampler's schedule reads the tables"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        self.records: dict[str, LayerRecord] = {}

    def inject(self, backbone: nn.Module) -> None:
        modules = dict(backbone.named_modules())
        for name, record in self.records.items():
            attach(modules[name], "intq", IntLayer(modules[name], record, self.mode), where="replace")
        self.records = {}  # the layers hold what they need; the file's tensors go

    def use_schedule(self, backbone: nn.Module, timesteps: Any) -> None:
        """As EfficientDM's: a sampler's step index i reads each table at its own i-th timestep."""
        for _, piece in adapter_modules(backbone):
            if isinstance(piece, IntLayer):
                piece.a_quant.use_schedule(timesteps, self.resample)

    def unload(self, backbone: nn.Module) -> nn.Module:
        raise NotMergeable("a loaded integer export has released its float weights; there is no backbone to go back to")

    def _why_not_mergeable(self) -> str:
        return "it is already the deployed integer model (the weights are the file's integers)"


# -- loading ---------------------------------------------------------------------------------------------------
def _describe(sig: dict[str, Any]) -> str:
    return f"{sig['name']!r} ({sig['class']}, {sig['num_tensors']} tensors, shapes {sig['shapes_sha1']})"


def _check_fits(path: Path, header: dict, records: dict[str, LayerRecord], others: dict, backbone: nn.Module) -> None:
    """Refuse (AdapterMismatch, naming both) a backbone the file was not made for, before anything changes."""
    ours = backbone_signature(backbone)
    if header["backbone"] != ours:
        raise AdapterMismatch(
            f"integer export {str(path)!r} was made for backbone {_describe(header['backbone'])}, but the backbone "
            f"given is {_describe(ours)}; build the backbone the model was exported from"
        )
    if header["method"].get("name") != "efficientdm":
        raise AdapterMismatch(f"{str(path)!r} holds method {header['method'].get('name')!r}, not efficientdm")
    modules = dict(backbone.named_modules())
    for name, record in records.items():
        host = modules.get(name)
        kind = "linear" if isinstance(host, nn.Linear) else "conv2d" if isinstance(host, nn.Conv2d) else None
        if kind != record.kind or list(host.weight.shape) != record.weight_shape:
            raise AdapterMismatch(f"{str(path)!r}: layer {name!r} is a {record.kind} {record.weight_shape} in the file")
    state = backbone.state_dict()
    expected = {k: v for k, v in state.items() if k.rpartition(".")[0] not in records}
    wrong = sorted(set(expected) ^ set(others))
    wrong += [k for k in others if k in expected and others[k].shape != expected[k].shape]
    if wrong:
        raise AdapterMismatch(f"{str(path)!r} does not fit this backbone's tensors: {wrong[:4]}")


def _release(host: nn.Module) -> None:
    """The host's float weight and bias as zero-stride views of their shapes: no memory, same signature."""
    for name in ("weight", "bias"):
        tensor = getattr(host, name, None)
        if tensor is not None:
            empty = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
            setattr(host, name, nn.Parameter(empty, requires_grad=False))


def load_int_model(path: str | os.PathLike, backbone: nn.Module, mode: str = "dequantize") -> PeftModel:
    """The exported model on `backbone` (a freshly built one of the same architecture; its weights are replaced by
    the file's), in eval mode. `mode`: "dequantize" or "int" (see the module docstring). A backbone of another
    architecture is refused (AdapterMismatch) before anything changes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "int" and not int_mm_works():
        raise NotSupported("mode='int' needs torch._int_mm on this device (int8 x int8 -> int32); use 'dequantize'")
    path = Path(path)
    header, records, others = read_int_file(path)
    _check_fits(path, header, records, others, backbone)
    method = IntModel(mode=mode, resample=header["method"]["config"].get("resample", "interpolate"))
    method.records = records
    model = PeftModel(backbone, method)
    with torch.no_grad():
        state = model.backbone.state_dict(keep_vars=True)
        for key, value in others.items():
            state[key].copy_(value.to(state[key].dtype))
    modules = dict(model.backbone.named_modules())
    for name in records:
        _release(modules[name])
    return model.eval()
