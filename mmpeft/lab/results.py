"""Aggregating benchmark results: per-task means over seeds, group means, and both VTAB means.

VTAB papers average two ways: (G) the mean of the three group means (VPT, arXiv 2203.12119;
NOAH, arXiv 2206.04673) and (T) the plain mean of the 19 tasks (SSF, arXiv 2210.08823; V-PETL Bench,
synbol/Parameter-Efficient-Transfer-Learning-Benchmark README). Tables say which is which.

Any scalar metric can be aggregated; a row (a sweep cell's result) holds it in `metrics[name]`, or,
for `val/acc` / `test/acc`, in the legacy `val_acc` / `test_acc` keys of older summaries. The rule
for units: a metric whose name ends with "acc" is an accuracy logged as a fraction in [0, 1], so it is
shown in percent (x100, two decimals) with the group means and both VTAB means; any other metric
(FID, a loss, ...) is shown as logged (four significant digits) with one plain `mean` over the tasks,
since a mean of group means is a VTAB accuracy convention and says nothing about which way is better.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmpeft.core.errors import MmpeftError
from mmpeft.core.report import human
from mmpeft.lab.records import mean_std

__all__ = [
    "MetricMissing",
    "metrics_of",
    "metric_value",
    "is_accuracy",
    "metric_label",
    "task_stats",
    "group_means",
    "summarize",
    "results_table",
]

LEGACY_KEYS = {"val/acc": "val_acc", "test/acc": "test_acc"}  # summaries written before `metrics` existed


class MetricMissing(MmpeftError, LookupError):
    """A cell's summary lacks the metric a sweep selects or reports (a misspelt name, or one the task never logs)."""


def metrics_of(row: Mapping[str, Any]) -> dict[str, float]:
    """Every metric a cell's result has: its `metrics` mapping, over the legacy `val_acc` / `test_acc` keys."""
    found = {name: row[key] for name, key in LEGACY_KEYS.items() if row.get(key) is not None}
    found.update({name: value for name, value in (row.get("metrics") or {}).items() if value is not None})
    return found


def metric_value(row: Mapping[str, Any], name: str) -> float:
    """One metric of a cell's result; a one-line `MetricMissing` naming the cell and what it has otherwise."""
    found = metrics_of(row)
    if name not in found:
        cell = row.get("id") or f"{row.get('task')}/{row.get('method')} seed {row.get('seed')} {row.get('point')}"
        has = ", ".join(sorted(found)) or "none"
        raise MetricMissing(f"metric {name!r} is not in the summary of cell {cell}; it has: {has}")
    return float(found[name])


def is_accuracy(metric: str) -> bool:
    """The unit rule: names ending with "acc" are fractions in [0, 1], reported in percent."""
    return metric.endswith("acc")


def metric_label(metric: str) -> str:
    """How tables name the metric: 'test/acc (%)', 'test/fid'."""
    return f"{metric} (%)" if is_accuracy(metric) else metric


def _fmt(value: float, metric: str) -> str:
    return f"{value:.2f}" if is_accuracy(metric) else f"{value:.4g}"


def _mean_std(stats: Mapping[str, Any] | None, metric: str) -> str:
    """'71.25 ± 0.40' ('71.25' for one seed, '' for a task the method has no result on)."""
    if stats is None:
        return ""
    return _fmt(stats["mean"], metric) + (f" ± {_fmt(stats['std'], metric)}" if stats["n"] > 1 else "")


def task_stats(rows: Iterable[Mapping[str, Any]], metric: str = "test/acc") -> dict[tuple[str, str], dict]:
    """(method, task) -> mean, std (0 for one seed), n seeds and mean trainable parameters (accuracies in %)."""
    scale = 100.0 if is_accuracy(metric) else 1.0
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["method"], row["task"])].append(row)
    stats = {}
    for key, cell_rows in grouped.items():
        mean, std = mean_std(scale * metric_value(r, metric) for r in cell_rows)
        stats[key] = {
            "mean": mean,
            "std": std,
            "n": len(cell_rows),
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


def summarize(
    rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None = None, metric: str = "test/acc"
) -> list[dict[str, Any]]:
    """One summary row per method: per-task `mean ± std`, the means (see the module docstring), parameters."""
    stats = task_stats(rows, metric)
    methods = sorted({m for m, _ in stats})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for method in methods:
        per_task = {t: stats[(method, t)]["mean"] for t in tasks if (method, t) in stats}
        row: dict[str, Any] = {"method": method}
        for t in tasks:
            row[t] = _mean_std(stats.get((method, t)), metric)
        if per_task and is_accuracy(metric):
            for name, value in group_means(per_task, groups or {}).items():
                row[name] = _fmt(value, metric)
        elif per_task:
            row["mean"] = _fmt(statistics.fmean(per_task.values()), metric)
        row["params"] = human(statistics.fmean(stats[(method, t)]["trainable"] for t in per_task))
        out.append(row)
    return out


def results_table(
    rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None = None, metric: str = "test/acc"
) -> str:
    """The markdown table of `summarize`; its caller names the metric with `metric_label` above it."""
    from mmpeft.core.report import markdown_table

    return markdown_table(summarize(rows, groups, metric))
