"""Where a training step's memory goes: the tensors autograd saves for backward, by module and method piece.

Peak training memory above the frozen forward is mostly what autograd keeps for backward. This runs one
training step under `torch.autograd.graph.saved_tensors_hooks` and charges every saved tensor to the module
whose forward was running when it was saved (the innermost one), counting each storage once: a tensor
saved twice (by two ops, or by two modules) is charged where it was first saved and its other saves are
counted as `resaved`, so "saved twice" shows up instead of inflating the total. Parameters that autograd
keeps (a linear's weight, for its input gradient) are not activation memory and are left out.
`mmpeft bench --memory` prints the table per method; `rows_by_pattern` folds block indices (`blocks.3.` ->
`blocks.*.`) so a 12-block model gives one row per position.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmpeft.core.modules import adapter_modules

__all__ = [
    "SavedTensors",
    "saved_tensors",
    "rows_by_pattern",
    "breakdown_markdown",
]


@dataclass
class SavedTensors:
    """Bytes of saved storages per module (each storage once), how often a storage was saved again, and which
    module names belong to method pieces."""

    bytes_by_module: dict[str, int] = field(default_factory=dict)
    resaved_by_module: dict[str, int] = field(default_factory=dict)
    pieces: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_module.values())

    def piece_bytes(self) -> int:
        return sum(b for name, b in self.bytes_by_module.items() if self.is_piece(name))

    def is_piece(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.pieces)


def saved_tensors(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                  forward: Callable[[nn.Module, Any], Any] | None = None) -> SavedTensors:  # fmt: skip
    """Run one forward + backward of `model` and attribute every tensor saved for backward."""
    names = {module: name or "(model)" for name, module in model.named_modules()}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    seen: set[int] = set()
    result = SavedTensors()
    result.pieces = {f"backbone.{prefix}" for prefix, _ in adapter_modules(getattr(model, "backbone", model))}
    by_module: dict[str, int] = defaultdict(int)
    resaved: dict[str, int] = defaultdict(int)

    def enter(module: nn.Module, *_: Any) -> None:
        stack.append(names.get(module, type(module).__name__))

    def leave(module: nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in parameters or pointer == 0:
            return tensor
        owner = stack[-1] if stack else "(outside any module)"
        if pointer in seen:
            resaved[owner] += 1
        else:
            seen.add(pointer)
            by_module[owner] += storage.nbytes()
        return tensor

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = forward(model, inputs) if forward else model(inputs)
            loss = loss_fn(outputs, targets)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    result.bytes_by_module, result.resaved_by_module = dict(by_module), dict(resaved)
    return result


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def rows_by_pattern(saved: SavedTensors) -> list[dict[str, Any]]:
    """One row per module pattern (block indices folded), largest first: MiB saved, share of the total,
    storages saved again, and whether the module is a method piece."""
    grouped: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name in set(saved.bytes_by_module) | set(saved.resaved_by_module):
        row = grouped[_pattern(name)]
        row[0] += saved.bytes_by_module.get(name, 0)
        row[1] += saved.resaved_by_module.get(name, 0)
        row[2] = row[2] or int(saved.is_piece(name))
    total = saved.total or 1
    rows = [
        {
            "module": pattern,
            "MiB": round(b / 2**20, 2),
            "share": round(b / total, 3),
            "resaved": r,
            "piece": bool(p),
        }  # fmt: skip
        for pattern, (b, r, p) in grouped.items()
    ]
    return sorted(rows, key=lambda row: (-row["MiB"], row["module"]))


def breakdown_markdown(method: str, saved: SavedTensors, top: int = 15) -> str:
    """A markdown table of the largest rows, with the totals (all saved storages, method pieces, resaves)."""
    rows = rows_by_pattern(saved)
    lines = [
        f"### {method}: {saved.total / 2**20:.1f} MiB saved for backward ({saved.piece_bytes() / 2**20:.1f} MiB by "
        f"method pieces; {sum(saved.resaved_by_module.values())} storages saved more than once)",
        "",
        "| module | MiB | share | saved again | method piece |",
        "|---|---|---|---|---|",
    ]
    for row in rows[:top]:
        piece = "yes" if row["piece"] else ""
        lines.append(f"| {row['module']} | {row['MiB']:.2f} | {row['share']:.1%} | {row['resaved']} | {piece} |")
    if len(rows) > top:
        rest = sum(r["MiB"] for r in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | {rest:.2f} | | | |")
    return "\n".join(lines) + "\n"
