"""Aggregating benchmark results: per-task means over seeds, group means, and both VTAB means.

VTAB papers average two ways (spec vision.md §2.1): (G) the mean of the three group means
(VPT, NOAH) and (T) the plain mean of the 19 tasks (SSF, V-PETL). Tables say which is which.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmpeft.core.report import human

__all__ = ["task_stats", "group_means", "summarize", "results_table"]


def task_stats(rows: Iterable[Mapping[str, Any]], metric: str = "test_acc") -> dict[tuple[str, str], dict]:
    """(method, task) -> mean, std (0 for one seed), n seeds and mean trainable parameters."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["method"], row["task"])].append(row)
    stats = {}
    for key, cell_rows in grouped.items():
        values = [100.0 * float(r[metric]) for r in cell_rows]
        stats[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
            "trainable": statistics.fmean(float(r.get("trainable", 0)) for r in cell_rows),
        }
    return stats


def group_means(per_task: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Group means of per-task values, then `mean(G)` (of the groups) and `mean(T)` (of the tasks)."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for task, value in per_task.items():
        by_group[groups.get(task, "all")].append(value)
    means = {group: statistics.fmean(values) for group, values in by_group.items()}
    return {**means, "mean(G)": statistics.fmean(means.values()), "mean(T)": statistics.fmean(per_task.values())}


def summarize(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One summary row per method: per-task `mean ± std`, group means, both means, parameters."""
    stats = task_stats(rows)
    methods = sorted({m for m, _ in stats})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for method in methods:
        per_task = {t: stats[(method, t)]["mean"] for t in tasks if (method, t) in stats}
        row: dict[str, Any] = {"method": method}
        for t in tasks:
            s = stats.get((method, t))
            row[t] = "" if s is None else (f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["n"] > 1 else ""))
        if per_task:
            for name, value in group_means(per_task, groups or {}).items():
                row[name] = f"{value:.2f}"
        row["params"] = human(statistics.fmean(stats[(method, t)]["trainable"] for t in per_task))
        out.append(row)
    return out


def results_table(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None = None) -> str:
    from mmpeft.core.report import markdown_table  # noqa: PLC0415

    return markdown_table(summarize(rows, groups))
