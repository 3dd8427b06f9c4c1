"""Parameter counts: trainable with and without the head, as a share of the frozen backbone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules

__all__ = ["ParamReport", "parameter_report", "markdown_table", "human"]


@dataclass
class ParamReport:
    method: str
    trainable: int  # everything the optimizer sees, head included
    trainable_no_head: int
    head: int
    backbone: int  # the frozen backbone's own parameters (method modules excluded)
    method_modules: int  # parameters the method added (the rest of trainable_no_head is unfrozen backbone)

    @property
    def percent(self) -> float:
        """Trainable without head, as % of the backbone."""
        return 100.0 * self.trainable_no_head / max(self.backbone, 1)

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "percent": round(self.percent, 4)}


def parameter_report(model: PeftModel) -> ParamReport:
    added = {id(p) for _, m in adapter_modules(model.backbone) for p in m.parameters()}
    backbone = sum(p.numel() for p in model.backbone.parameters() if id(p) not in added)
    method_modules = sum(p.numel() for p in model.backbone.parameters() if id(p) in added)
    in_backbone = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    return ParamReport(model.method.name, in_backbone + head, in_backbone, head, backbone, method_modules)


def human(n: float) -> str:
    """1234567 -> '1.23M' (the papers' convention)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
