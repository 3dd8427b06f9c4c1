"""Task heads from a YAML spec, recorded in adapter files so a file rebuilds its own head.

`{name: linear}` (the default) or `{name: mlp, hidden: [256, 256], norm: batch, dropout: 0.5}` (the
point-cloud papers' head: Linear -> BatchNorm -> ReLU -> Dropout per hidden layer, then Linear).
`init` sets the initialisation of every Linear in the head: "default" (PyTorch's), "zeros",
"normal:<std>", "trunc_normal:<std>" or "kaiming_normal_fan_out", biases zero or ";bias=<value>";
unset, the method's `head_init` (set by its `paper` preset where the official code initialises the
head its own way) decides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import UnknownName, WeightsUnavailable
from mmpeft.core.modules import make_activation

__all__ = [
    "build_head", "head_spec", "init_head", "HEADS", "VPT_HEAD", "CheckpointHead", "read_checkpoint_head",
    "load_checkpoint_head",
]  # fmt: skip

HEADS = ("linear", "mlp")
# VPT's head (KMnP/vpt `src/models/mlp.py` L53-57, `MLP(..., special_bias=True)` for every ViT transfer
# type): kaiming-normal weight (fan_out) and the prior bias -log((1 - 0.01) / 0.01). MoSA, built on the
# VPT codebase, keeps it (Theia-4869/MoSA `src/models/mlp.py` L52-57).
VPT_HEAD = "kaiming_normal_fan_out;bias=-4.59511985013459"
_MLP_KEYS = {"hidden", "norm", "dropout", "activation", "hidden_bias"}  # hidden_bias: default true


def head_spec(spec: str | dict[str, Any] | None, num_classes: int) -> dict[str, Any]:
    """The full spec of a head: its name, `num_classes` and every option (what adapter files record)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "linear"})
    name = spec.setdefault("name", "linear")
    if name not in HEADS:
        raise UnknownName(f"unknown head {name!r}; heads: {', '.join(HEADS)} (e.g. {{name: mlp, hidden: [256, 256]}})")
    allowed = {"name", "num_classes", "init"} | (_MLP_KEYS if name == "mlp" else set())
    unknown = set(spec) - allowed
    if unknown:
        raise UnknownName(f"head {name!r} has no option(s) {sorted(unknown)}; options: {sorted(allowed - {'name'})}")
    spec["num_classes"] = int(num_classes)
    if name == "mlp":
        spec = {"hidden": [256, 256], "norm": "batch", "dropout": 0.5, "activation": "relu", **spec}
        spec["hidden"] = [int(h) for h in spec["hidden"]]
        if spec["norm"] not in ("batch", "layer", None, "none"):
            raise ValueError(f"mlp head norm must be 'batch', 'layer' or 'none', got {spec['norm']!r}")
    return spec


def _mlp(in_features: int, spec: dict[str, Any]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in spec["hidden"]:
        layers.append(nn.Linear(width, hidden, bias=spec.get("hidden_bias", True)))
        if spec["norm"] == "batch":
            layers.append(nn.BatchNorm1d(hidden))
        elif spec["norm"] == "layer":
            layers.append(nn.LayerNorm(hidden))
        layers.append(make_activation(spec["activation"]))
        if spec["dropout"]:
            layers.append(nn.Dropout(spec["dropout"]))
        width = hidden
    layers.append(nn.Linear(width, spec["num_classes"]))
    return nn.Sequential(*layers)


_WEIGHT_INITS = ("default", "zeros", "normal", "trunc_normal", "kaiming_normal_fan_out")


def _parse_init(init: str) -> tuple[str, float | None, float | None]:
    """ "kind[:std][;bias=<value>]" -> (kind, std, bias)."""
    weight, _, bias = init.partition(";")
    kind, _, std = weight.partition(":")
    needs_std = kind in ("normal", "trunc_normal")
    if kind not in _WEIGHT_INITS or needs_std != bool(std) or (bias and not bias.startswith("bias=")):
        raise ValueError(
            f"unknown head init {init!r}; use default, zeros, normal:<std>, trunc_normal:<std> or "
            "kaiming_normal_fan_out, optionally followed by ;bias=<value> (biases are zero otherwise)"
        )
    return kind, float(std) if std else None, float(bias[5:]) if bias else None


@torch.no_grad()
def init_head(head: nn.Module, init: str) -> None:
    """Initialise every Linear of `head`: "default" (PyTorch's), "zeros", "normal:<std>",
    "trunc_normal:<std>" (timm's: cut at ±2 absolute), or "kaiming_normal_fan_out" (VPT's `MLP` head); biases
    zero, or ";bias=<value>" (VPT's prior bias -log(99))."""
    kind, std, bias = _parse_init(init)
    if kind == "default":
        return
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            if kind == "zeros":
                nn.init.zeros_(layer.weight)
            elif kind == "normal":
                nn.init.normal_(layer.weight, std=std)
            elif kind == "trunc_normal":
                nn.init.trunc_normal_(layer.weight, std=std)  # cut at ±2 absolute, as timm's trunc_normal_
            else:
                nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_out")
            if layer.bias is not None:
                nn.init.constant_(layer.bias, bias or 0.0)


def build_head(spec: dict[str, Any], in_features: int, default_init: str | None = None) -> nn.Module:
    """A head from a full spec (see `head_spec`) on `in_features` pooled features."""
    spec = copy.deepcopy(spec)
    head = nn.Linear(in_features, spec["num_classes"]) if spec["name"] == "linear" else _mlp(in_features, spec)
    init = spec.get("init") or default_init
    if init:
        init_head(head, init)
    return head


# -- heads that come with a backbone's weights file ------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointHead:
    """A task head found in a backbone's weights file (e.g. `cls_head_finetune.*` of an official fine-tuned
    Point-MAE checkpoint): its full spec (`head_spec`), its state dict in that head's keys, and the file. The
    backbone keeps it as `checkpoint_head`; `PeftModel` loads it into the head it builds (`load_checkpoint_head`),
    so evaluating a fine-tuned checkpoint scores its own head, not a random one."""

    spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    source: str


def _spec_text(spec: dict[str, Any]) -> str:
    options = ", ".join(f"{k} {v}" for k, v in spec.items() if k not in ("name", "num_classes", "init"))
    return f"{spec['name']} head ({options + ', ' if options else ''}{spec['num_classes']} classes)"


def read_checkpoint_head(
    layout: str | dict[str, Any] | None, state: dict[str, torch.Tensor], in_features: int, source: str
) -> CheckpointHead | None:
    """`state` as a head of spec `layout` on `in_features` features, its class count read off its last layer;
    None when its keys or shapes are not exactly that layout's (a head of another design)."""
    layers = [int(k.split(".", 1)[0]) for k in state if k.split(".", 1)[0].isdigit()]
    last = f"{max(layers)}.weight" if layers and len(layers) == len(state) else "weight"
    if last not in state or state[last].dim() != 2:
        return None
    spec = head_spec(layout, int(state[last].shape[0]))
    with torch.device("meta"):
        expected = build_head(spec, in_features).state_dict()
    if expected.keys() != state.keys() or any(expected[k].shape != v.shape for k, v in state.items()):
        return None
    return CheckpointHead(spec, dict(state), str(source))


def _without_init(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "init"}


def load_checkpoint_head(head: nn.Module, spec: dict[str, Any], found: CheckpointHead | None) -> str | None:
    """Load the head of a backbone's weights file into `head` (built from the full spec `spec`) and return the
    file's name; None when the file had no head. A head of another spec (another class count, another design)
    cannot take it: that is refused, since training or testing would silently start from a random head instead
    of the file's."""
    if found is None:
        return None
    if _without_init(spec) != _without_init(found.spec):
        raise WeightsUnavailable(
            f"the weights file {found.source!r} holds a fine-tuned {_spec_text(found.spec)}, but the task builds a "
            f"{_spec_text(spec)}, which cannot take it. To evaluate or continue the fine-tuned model, use its head: "
            f"num_classes={found.spec['num_classes']} and the backbone's default head. To train a fresh head on the "
            "fine-tuned backbone instead, set the backbone's load_head: false (e.g. "
            "--model.init_args.backbone.init_args.load_head false)."
        )
    head.load_state_dict(found.state, strict=True)
    return found.source
