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
from typing import Any

import torch
from torch import nn

from mmpeft.core.errors import UnknownName
from mmpeft.core.modules import make_activation

__all__ = ["build_head", "head_spec", "init_head", "HEADS", "VPT_HEAD"]

HEADS = ("linear", "mlp")
# VPT's head (KMnP/vpt `src/models/mlp.py` L53-57, `MLP(..., special_bias=True)` for every ViT transfer
# type): kaiming-normal weight (fan_out) and the prior bias -log((1 - 0.01) / 0.01). MoSA, built on the
# VPT codebase, keeps it (Theia-4869/MoSA `src/models/mlp.py` L52-57).
VPT_HEAD = "kaiming_normal_fan_out;bias=-4.59511985013459"
_MLP_KEYS = {"hidden", "norm", "dropout", "activation"}


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
        layers.append(nn.Linear(width, hidden))
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
