"""Pieces on the q / k / v thirds of a fused qkv linear (timm's and open_clip's `attn.qkv`).

Name-targeted methods address a third with a trailing selection, `"attn.qkv[q,v]"`; each selected third gets
its own piece, whose output is added to that third of the linear's output, and whose weight delta fills
that third's rows when merged. LoRA and SVFit share this.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.modules import LowRank, add_matmul

__all__ = ["QKV", "parse_fused_target", "part_rows", "add_to_parts", "add_low_rank_to_parts", "parts_delta_weight"]

QKV = "qkv"
_PARTS_SUFFIX = re.compile(r"^(?P<pattern>.+?)\[(?P<parts>[A-Za-z,]+)\]$")


def parse_fused_target(target: str, method: str) -> tuple[str, tuple[str, ...]]:
    """`"attn.qkv[q,v]"` -> ("attn.qkv", ("q", "v")). Only a trailing `[...]` of comma-separated q / k / v
    names parts; any other brackets are glob character classes (`"blocks.[0-5].mlp.fc1"`)."""
    target = target.replace(" ", "")
    m = _PARTS_SUFFIX.match(target)
    if not target or (m and not all(p in QKV for p in m["parts"].split(","))):
        raise ValueError(
            f"bad {method} target {target!r}; use a module name pattern (globs allowed), optionally with a trailing "
            "[q,k,v] selection of fused-qkv parts"
        )
    return (m["pattern"], tuple(m["parts"].split(","))) if m else (target, ())


def part_rows(part: str, out_features: int) -> slice:
    """The output rows of third `part` ("q", "k" or "v") of a fused linear with `out_features` outputs."""
    width = out_features // 3
    i = QKV.index(part)
    return slice(i * width, (i + 1) * width)


def add_to_parts(y: torch.Tensor, pieces: Mapping[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
    """`y` with `pieces[p](x)` added to third p of its last dimension, for every selected part."""
    chunks = list(y.chunk(3, dim=-1))
    for part, piece in pieces.items():
        i = QKV.index(part)
        chunks[i] = chunks[i] + piece(x)
    return torch.cat(chunks, dim=-1)


def add_low_rank_to_parts(y: torch.Tensor, deltas: Mapping[str, LowRank], x: torch.Tensor) -> torch.Tensor:
    """`y` plus each part's low-rank delta in its third, as one rank-(r · parts) update: the parts' A stacked
    into one down-projection, their B placed in a block matrix that is zero on the unselected thirds, and one
    `addmm` into a single new tensor. The per-part route (`add_to_parts`) allocates each part's delta, the sum
    per third and the concatenation; this one allocates the output only (the same work as peft's LoRA on the
    whole fused linear, the extra zero rows cost r · parts MACs per output). The parts share one dropout mask."""
    parts = list(deltas)
    first = deltas[parts[0]]
    if first.conv or any(d.scale != first.scale or d.rank != first.rank for d in deltas.values()):
        return add_to_parts(y, deltas, x)
    h = F.linear(first.dropout(x), torch.cat([deltas[p].A for p in parts]))
    zeros = first.B.new_zeros(first.B.shape)
    blocks = [torch.cat([deltas[p].B if p == part else zeros for p in parts], dim=1) for part in QKV]
    return add_matmul(y, h, torch.cat(blocks), first.scale)


def parts_delta_weight(host: nn.Linear, deltas: Mapping[str, Callable[[], torch.Tensor]],
                       dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The host's whole weight delta in `dtype`: each part's delta in its rows, zero elsewhere."""
    full = torch.zeros(host.weight.shape, device=host.weight.device, dtype=dtype)
    for part, delta in deltas.items():
        full[part_rows(part, host.out_features)] = delta().to(device=full.device, dtype=dtype)
    return full
