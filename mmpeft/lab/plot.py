"""Comparison plots from result CSVs, and result tables as grouped W&B runs.

`mmpeft plot CSV [CSV ...] --out DIR` writes one PNG per CSV, its kind told by its columns (or `--kind`):

- a bench table (`mmpeft bench`, `experiments/bench/*.csv`): per method, the median step time and the
  peak memory as bars with min..max error bars (when the table has `*_min` / `*_max` columns), the floor
  as a dashed reference line, the ratio to the floor above each bar; inference time (unmerged and
  merged) as a third panel when the table has `infer_ms`. Rows with an `error` are left out.
- an accuracy table (a sweep's `cells.csv`, a transfer table with `acc_mean` / `acc_std`, or any table
  with a method, `trainable` and an accuracy column): accuracy against trainable parameters on a log
  axis, one labelled marker per method, std error bars when the table has them (or over seed rows), one
  series per `shots` value when that column exists. A sweep's stage-1 (tuning) rows are left out when
  stage-2 rows exist; several tasks (or datasets) are averaged per method (the plain mean of the tasks,
  without error bars). Methods with 0 trainable parameters (zero-shot) are horizontal reference lines,
  since a log axis has no 0.
  Units follow `mmpeft.lab.results`: a logged metric such as `test/acc` is a fraction, shown in percent;
  other columns (`acc_mean`, `accuracy`) are drawn as written.

Columns are read by name, so older tables without some columns still plot (that element is skipped). A row
that cannot be read (another number of fields than the header, no number where a plotted value belongs) is
left out with a `SkippedRow` warning naming `file:line` and why (`mmpeft plot` prints it); a folder stands for
the CSVs in it.
An existing PNG is not replaced without `--overwrite` (`OutputExists`, exit 2), and every output is
checked before any is written. Drawing uses matplotlib's Agg canvas directly: no display, no pyplot state.

`log_table_to_wandb` logs one W&B run per table row (name = its method, all in one group), offline unless
asked otherwise; `mmpeft bench` uses it to group a bench's rows.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmpeft.core.errors import MmpeftError, OutputExists
from mmpeft.lab import records

__all__ = [
    "PlotInputError",
    "SkippedRow",
    "read_table",
    "csv_paths",
    "detect_kind",
    "accuracy_column",
    "accuracy_points",
    "bench_figure",
    "accuracy_figure",
    "plot_tables",
    "log_table_to_wandb",
    "add_plot_arguments",
    "plot_command",
]

KINDS = ("bench", "accuracy")
BENCH_VALUES = ("step_ms", "peak_mem_mb")
ACCURACY_NAMES = ("acc_mean", "accuracy", "acc", "test/acc")
LABEL_COLUMNS = ("method", "run")
TASK_COLUMNS = ("task", "dataset")  # several of them: each method's mean over them
DEFAULT_OUT = "runs/plots"

EXPECTED = (
    "a bench table needs `method` and `step_ms` or `peak_mem_mb` (as `mmpeft bench` writes); an accuracy "
    "table needs `method` (or `run`), `trainable` and an accuracy column (acc_mean, accuracy, acc, test/acc "
    "or another *acc metric; or name it with --metric)"
)


class PlotInputError(MmpeftError, ValueError):
    """A CSV that cannot be plotted: neither kind of columns, or no usable rows."""


class SkippedRow(UserWarning):
    """A row left out of a plot because it cannot be read; the message names `file:line` and why."""


class Row(dict):
    """A table row that knows where it was read (`file:line`), so a row left out can be named."""

    where: str = ""


def _skip(row: Mapping[str, Any], index: int, reason: str) -> None:
    where = getattr(row, "where", "") or f"row {index + 1}"
    warnings.warn(f"{where}: {reason}; row left out of the plot", SkippedRow, stacklevel=3)


# -- reading -----------------------------------------------------------------------------------------------


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV; a missing file is FileNotFoundError, an empty one PlotInputError. A row with
    another number of fields than the header is left out with a `SkippedRow` warning naming its line."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for index, raw in enumerate(reader):
            row = Row({(k or "").strip(): v for k, v in raw.items() if k is not None})
            row.where = f"{path}:{reader.line_num}"
            if None in raw or None in raw.values():  # DictReader: extra fields under None, missing ones None
                fields = sum(v is not None for k, v in raw.items() if k is not None) + len(raw.get(None) or [])
                _skip(row, index, f"{fields} fields, the header has {len(reader.fieldnames or [])}")
                continue
            rows.append(row)
        columns = [c.strip() for c in reader.fieldnames or []]
    if not columns:
        raise PlotInputError(f"{path}: empty file, no header; {EXPECTED}")
    return columns, rows


def csv_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The CSV files to plot: a file as it is, a folder as the CSVs in it (sorted); PlotInputError for a
    folder without any."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.glob("*.csv") if p.is_file())
            if not inside:
                raise PlotInputError(f"{path}: a folder without CSV files; pass result CSVs or a folder of them")
            found += inside
        else:
            found.append(path)
    return found


def _num(value: Any) -> float | None:
    """A finite number, or None for an empty, 'n/a' or non-numeric cell."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _failed(row: Mapping[str, Any]) -> bool:
    return bool(str(row.get("error") or "").strip())


def _label_column(columns: Sequence[str]) -> str | None:
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def accuracy_column(columns: Sequence[str], metric: str | None = None) -> str | None:
    """The accuracy column to plot: `metric` when given (PlotInputError when absent), else the first of
    acc_mean, accuracy, acc, test/acc, another test/*acc metric, any *acc column; None when there is none."""
    if metric is not None:
        if metric not in columns:
            raise PlotInputError(f"no column {metric!r} (--metric); the columns are: {', '.join(columns)}")
        return metric
    for name in ACCURACY_NAMES:
        if name in columns:
            return name
    test = [c for c in columns if c.startswith("test/") and c.endswith("acc")]
    return (test or [c for c in columns if c.endswith("acc")] or [None])[0]


def _std_column(columns: Sequence[str], metric: str) -> str | None:
    base = metric.removesuffix("_mean")
    return next((c for c in (f"{base}_std", f"{metric}_std") if c in columns), None)


def detect_kind(columns: Sequence[str], where: str = "table", metric: str | None = None) -> str:
    """'bench' or 'accuracy' from the columns (bench first); PlotInputError naming what each kind needs."""
    if "method" in columns and any(c in columns for c in BENCH_VALUES):
        return "bench"
    if _label_column(columns) and "trainable" in columns and accuracy_column(columns, metric):
        return "accuracy"
    raise PlotInputError(f"{where}: cannot tell what to plot from its columns ({', '.join(columns)}); {EXPECTED}")


def _check_kind(columns: Sequence[str], kind: str, where: str, metric: str | None) -> None:
    """PlotInputError naming what a table lacks for the kind asked with --kind."""
    if kind == "bench":
        missing = [c for c in ("method",) if c not in columns]
        if not any(c in columns for c in BENCH_VALUES):
            missing.append(" or ".join(BENCH_VALUES))
    else:
        missing = [] if _label_column(columns) else ["method (or run)"]
        missing += [] if "trainable" in columns else ["trainable"]
        missing += [] if accuracy_column(columns, metric) else ["an accuracy column (acc_mean, accuracy, ...)"]
    if missing:
        article = "an" if kind == "accuracy" else "a"
        lacks = ", ".join(missing)
        raise PlotInputError(
            f"{where}: not {article} {kind} table, it lacks {lacks}; its columns: {', '.join(columns)}"
        )


# -- accuracy points ---------------------------------------------------------------------------------------


def _is_logged_accuracy(metric: str) -> bool:
    """A logged metric (`test/acc`): a fraction, shown in percent (the `mmpeft.lab.results` unit rule)."""
    from mmpeft.lab.results import is_accuracy

    return "/" in metric and is_accuracy(metric)


def accuracy_points(
    rows: Sequence[Mapping[str, Any]], metric: str | None = None, columns: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """(points, y label): one point per (series, method) with `series` (the shots value or ''), `label`,
    `trainable`, `acc` and `std` (None when unknown); see the module docstring for the rules."""
    columns = list(columns if columns is not None else dict.fromkeys(k for r in rows for k in r))
    label_col = _label_column(columns)
    metric = accuracy_column(columns, metric)
    if label_col is None or metric is None or "trainable" not in columns:
        raise PlotInputError(f"not an accuracy table (columns: {', '.join(columns)}); {EXPECTED}")
    std_col = _std_column(columns, metric)
    rows = [r for r in rows if not _failed(r)]
    if "stage" in columns and any(str(r.get("stage")).strip() == "2" for r in rows):
        rows = [r for r in rows if str(r.get("stage")).strip() == "2"]  # tuning runs are not results
    scale = 100.0 if _is_logged_accuracy(metric) else 1.0
    precisions = {str(r.get("precision") or "") for r in rows}
    task_col = next((c for c in TASK_COLUMNS if c in columns), None)
    tasks = {str(r.get(task_col) or "") for r in rows} if task_col else {""}

    cells: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)  # (series, label, task)
    for index, r in enumerate(rows):
        unreadable = [f"{c}={r.get(c)!r}" for c in (metric, "trainable") if _num(r.get(c)) is None]
        if unreadable:
            _skip(r, index, f"not a number: {', '.join(unreadable)}")
            continue
        label = str(r[label_col])
        if len(precisions) > 1:
            label += f" ({r.get('precision') or '?'})"
        series = str(r.get("shots") or "").strip() if "shots" in columns else ""
        cells[(series, label, str(r.get(task_col) or "") if len(tasks) > 1 else "")].append(r)
    if not cells:
        raise PlotInputError(f"no row has a number in both {metric!r} and 'trainable' (rows with an error are skipped)")

    per_task: dict[tuple[str, str], list[dict[str, float | None]]] = defaultdict(list)
    for (series, label, _task), group in cells.items():
        mean, spread = records.mean_std(scale * _num(r[metric]) for r in group)
        std: float | None = spread
        if len(group) == 1:  # one row: the spread its table gives, if any
            given = _num(group[0].get(std_col)) if std_col else None
            std = None if given is None else scale * given
        trainable = statistics.fmean(_num(r["trainable"]) for r in group)
        per_task[(series, label)].append({"acc": mean, "std": std, "trainable": trainable})

    points = []
    for (series, label), found in per_task.items():
        several = len(found) > 1  # a plain mean over tasks; a spread over tasks is not an error bar
        points.append(
            {
                "series": series,
                "label": label,
                "trainable": statistics.fmean(f["trainable"] for f in found),
                "acc": statistics.fmean(f["acc"] for f in found),
                "std": None if several else found[0]["std"],
            }
        )
    ylabel = f"{metric} (%)" if scale != 1.0 else metric
    if len(tasks) > 1:
        ylabel += f", mean of {len(tasks)} tasks"
    return points, ylabel


# -- figures -----------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # headless: renders with Agg whatever backend pyplot would pick
    return fig


BENCH_PANELS = (  # value column, min, max, ratio-to-floor column, axis label
    ("step_ms", "step_ms_min", "step_ms_max", "time_vs_floor", "train step (ms, median)"),
    ("peak_mem_mb", "peak_mem_min", "peak_mem_max", "mem_vs_floor", "peak memory (MB)"),
)


def bench_figure(rows: Sequence[Mapping[str, Any]], title: str = ""):
    """The bench figure: one panel per value the table has (step time, peak memory, inference time), a bar
    per method (the floor excluded), min..max error bars, the floor as a dashed line. Returns the Figure."""
    rows = [r for r in rows if not _failed(r)]
    precisions = {str(r.get("precision") or "") for r in rows}

    def label(r: Mapping[str, Any]) -> str:
        return str(r.get("method")) + (f" ({r.get('precision') or '?'})" if len(precisions) > 1 else "")

    rows = _readable_bench_rows(rows)
    floors = [r for r in rows if str(r.get("method")) == "floor"]
    methods = [r for r in rows if str(r.get("method")) != "floor"]
    panels = [p for p in BENCH_PANELS if any(_num(r.get(p[0])) is not None for r in methods)]
    infer = any(_num(r.get("infer_ms")) is not None for r in methods)
    if not panels and not infer:
        raise PlotInputError(f"no method row (besides the floor, without an error) has {' or '.join(BENCH_VALUES)}")
    count = len(panels) + infer
    fig = _figure(max(4.5, 0.5 * len(methods) + 1.8) * count, 4.4)
    axes = fig.subplots(1, count, squeeze=False)[0]
    for ax, (column, low, high, ratio, ylabel) in zip(axes, panels):
        shown = [r for r in methods if _num(r.get(column)) is not None]
        xs = list(range(len(shown)))
        values = [_num(r[column]) for r in shown]
        bars = ax.bar(xs, values, color="tab:blue", alpha=0.85)
        ranged = [(x, v, _num(r.get(low)), _num(r.get(high))) for x, v, r in zip(xs, values, shown)]
        ranged = [(x, v, lo, hi) for x, v, lo, hi in ranged if lo is not None and hi is not None]
        if ranged:
            ax.errorbar(
                [x for x, *_ in ranged],
                [v for _, v, *_ in ranged],
                yerr=[[max(v - lo, 0) for _, v, lo, _ in ranged], [max(hi - v, 0) for _, v, _, hi in ranged]],
                fmt="none", ecolor="black", capsize=3, linewidth=1, label="min..max",
            )  # fmt: skip
        for floor in floors:
            value = _num(floor.get(column))
            if value is not None:
                ax.axhline(value, color="tab:red", linestyle="--", linewidth=1.2, label=f"{label(floor)}: {value:g}")
        for bar, r, v in zip(bars, shown, values):
            times = _num(r.get(ratio))
            if times is None and len(floors) == 1 and _num(floors[0].get(column)):
                times = v / _num(floors[0][column])
            if times is not None:
                ax.annotate(f"{times:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            xytext=(0, 2), textcoords="offset points", fontsize=7,
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
        _method_axis(ax, xs, [label(r) for r in shown], ylabel)
    if infer:
        _inference_panel(axes[-1], methods, floors, label)
    fig.suptitle(f"{title or 'bench'}: median per method, numbers above the bars are ratios to the floor", fontsize=10)
    return fig


def _readable_bench_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows with a number in at least one plotted value; a `SkippedRow` warning for each other row, and for
    each cell that holds something that is not a number (that panel leaves the row out)."""
    columns = [c for c in (*BENCH_VALUES, "infer_ms", "infer_merged_ms") if any(c in r for r in rows)]
    kept = []
    for index, r in enumerate(rows):
        garbage = [f"{c}={r[c]!r}" for c in columns if str(r.get(c) or "").strip() and _num(r[c]) is None]
        if not any(_num(r.get(c)) is not None for c in columns):
            _skip(r, index, f"no number in {' / '.join(columns)}" + (f" ({', '.join(garbage)})" if garbage else ""))
            continue
        if garbage:
            where = getattr(r, "where", "") or f"row {index + 1}"
            warnings.warn(f"{where}: not a number: {', '.join(garbage)}; left out of that panel", SkippedRow,
                          stacklevel=3)  # fmt: skip
        kept.append(r)
    return kept


def _method_axis(ax, xs: list[int], labels: list[str], ylabel: str) -> None:
    ax.set_xticks(xs, labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _inference_panel(ax, methods, floors, label) -> None:
    """Inference time per method: as trained (unmerged) and merged into the backbone, side by side."""
    shown = [r for r in methods if _num(r.get("infer_ms")) is not None]
    xs = list(range(len(shown)))
    ax.bar([x - 0.2 for x in xs], [_num(r["infer_ms"]) for r in shown], width=0.4, label="as trained")
    merged = [(x, _num(r.get("infer_merged_ms"))) for x, r in zip(xs, shown)]
    merged = [(x, v) for x, v in merged if v is not None]
    if merged:
        ax.bar([x + 0.2 for x, _ in merged], [v for _, v in merged], width=0.4, label="merged")
    for floor in floors:
        value = _num(floor.get("infer_ms"))
        if value is not None:
            ax.axhline(value, color="tab:red", linestyle="--", linewidth=1.2, label=f"{label(floor)}: {value:g}")
    _method_axis(ax, xs, [label(r) for r in shown], "inference (ms / batch)")


def accuracy_figure(points: Sequence[Mapping[str, Any]], ylabel: str = "accuracy", title: str = ""):
    """Accuracy against trainable parameters (log x axis): one errorbar series per `series` value, each
    marker labelled with its method; 0-parameter points are horizontal dotted lines. Returns the Figure."""
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    by_series: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        by_series[p["series"]].append(p)
    order = sorted(by_series, key=lambda s: (_num(s) is None, _num(s) or 0, s))
    markers = "osD^vP*Xh<>"
    colors = [f"C{i % 10}" for i in range(len(order))]
    for i, series in enumerate(order):
        name = f"{series}-shot" if series else None
        zero = [p for p in by_series[series] if p["trainable"] <= 0]
        shown = sorted((p for p in by_series[series] if p["trainable"] > 0), key=lambda p: p["trainable"])
        for p in zero:
            ax.axhline(p["acc"], color=colors[i], linestyle=":", linewidth=1.2,
                       label=f"{p['label']}{f', {name}' if name else ''} (0 trainable)")  # fmt: skip
        if not shown:
            continue
        stds = [p["std"] if p["std"] is not None else math.nan for p in shown]
        ax.errorbar(
            [p["trainable"] for p in shown],
            [p["acc"] for p in shown],
            yerr=None if all(math.isnan(s) for s in stds) else stds,
            fmt=markers[i % len(markers)], color=colors[i], capsize=3, markersize=6, linestyle="none", label=name,
        )  # fmt: skip
        for p in shown:
            ax.annotate(p["label"], (p["trainable"], p["acc"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=7, color=colors[i])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    with_std = any(p["std"] is not None for p in points)
    fig.suptitle((title or "accuracy") + (" (error bars: ± std)" if with_std else ""), fontsize=10)
    return fig


# -- files -------------------------------------------------------------------------------------------------


def _png_name(path: Path) -> str:
    """`<stem>.png`; a sweep's `cells.csv` is named after its folder (`<sweep>-cells.png`)."""
    return f"{path.parent.name}-{path.stem}.png" if path.stem in ("cells", "results") else f"{path.stem}.png"


def plot_tables(
    paths: Sequence[str | Path],
    out: str | Path = DEFAULT_OUT,
    kind: str | None = None,
    overwrite: bool = False,
    metric: str | None = None,
) -> list[Path]:
    """One PNG per CSV under `out`; every CSV is read and every output checked before anything is written
    (PlotInputError for a table that cannot be plotted, OutputExists for a PNG there already)."""
    out = Path(out)
    jobs = []
    for path in csv_paths(paths):
        columns, rows = read_table(path)
        if kind is None:
            found = detect_kind(columns, str(path), metric)
        else:
            _check_kind(columns, kind, str(path), metric)
            found = kind
        jobs.append((path, found, columns, rows, out / _png_name(path)))
    targets = [job[-1] for job in jobs]
    twice = sorted({str(t) for t in targets if targets.count(t) > 1})
    if twice:
        raise PlotInputError(f"two CSVs would write the same PNG ({', '.join(twice)}); plot them with separate --out")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise OutputExists(f"plot already exists: {', '.join(existing)}; pass --overwrite to replace it, or --out DIR")
    figures = []
    for path, found, columns, rows, target in jobs:  # draw all first: a bad table writes nothing
        title = target.stem
        try:
            if found == "bench":
                figures.append((bench_figure(rows, title=title), target))
            else:
                points, ylabel = accuracy_points(rows, metric, columns)
                figures.append((accuracy_figure(points, ylabel, title=title), target))
        except PlotInputError as err:
            raise PlotInputError(f"{path}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    for fig, target in figures:
        fig.savefig(target)
    return [target for _, target in figures]


# -- W&B ---------------------------------------------------------------------------------------------------


def _summary_value(value: Any) -> Any:
    """Numbers as numbers (CSV cells are strings), other non-empty values as they are, empty ones None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool | int | float):
        return value
    number = _num(value)
    if number is not None:
        return int(number) if number.is_integer() and "." not in str(value) else number
    return value


def resolve_wandb_mode(mode: str = "offline") -> str:
    """'disabled' | 'offline' | 'online': an explicit 'disabled' wins; else WANDB_MODE when set ('dryrun' is
    offline); else `mode` ('auto' = `mmpeft.lab.records.wandb_mode`: online only with an API key)."""
    mode = mode.lower()
    if mode == "disabled":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "offline", "online", "dryrun"):
        return "offline" if env == "dryrun" else env
    if mode == "auto":
        return records.wandb_mode("auto")
    if mode not in ("offline", "online"):
        raise PlotInputError(f"unknown W&B mode {mode!r}; use offline, online, disabled or auto")
    return mode


def log_table_to_wandb(
    rows: Iterable[Mapping[str, Any]],
    group: str,
    job_type: str,
    config: Mapping[str, Any],
    mode: str = "offline",
    project: str = "mmpeft",
    save_dir: str | Path | None = None,
) -> list[str]:
    """One W&B run per row, all in `group`: named after the row's method (or run), with `config` plus the
    method as its config and the row's non-empty values as summary metrics. Offline by default (the files go
    to `save_dir`, else WANDB_DIR, else ./wandb; `wandb sync` uploads them later); WANDB_MODE, when set, decides
    instead (see `resolve_wandb_mode`); 'disabled' logs and writes nothing. Returns the run ids."""
    mode = resolve_wandb_mode(mode)
    rows = list(rows)
    if mode == "disabled" or not rows:
        return []
    import wandb

    # the folder is resolved here, from this call's environment: wandb reads WANDB_DIR once per process (its
    # settings singleton), so a later change of WANDB_DIR would be ignored
    folder = save_dir if save_dir is not None else os.environ.get("WANDB_DIR") or "."
    Path(folder).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", save_code=False)
    ids = []
    for row in rows:
        name = str(row.get("method") or row.get("run") or "row")
        run = wandb.init(
            project=project, group=group, job_type=job_type, name=name, config={**config, "method": name},
            mode=mode, dir=str(folder), settings=settings,
            reinit="create_new",  # a run another caller left active in this process neither joins nor ends it
        )  # fmt: skip
        try:
            summary = {str(k): _summary_value(v) for k, v in row.items()}
            run.summary.update({k: v for k, v in summary.items() if v is not None})
            ids.append(run.id)
        finally:
            run.finish()
    return ids


# -- command line ------------------------------------------------------------------------------------------


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "csv",
        nargs="+",
        help="result CSVs (experiments/bench/*.csv, a sweep's cells.csv, transfer tables) or folders of them",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the PNGs (default {DEFAULT_OUT}/)")
    p.add_argument("--kind", choices=KINDS, default=None, help="bench | accuracy (default: told by the columns)")
    p.add_argument("--metric", default=None, help="the accuracy column to plot (default: acc_mean, accuracy, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs (otherwise refused)")


def plot_command(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRow)
        written = plot_tables(args.csv, args.out, args.kind, args.overwrite, args.metric)
    for warning in caught:
        if issubclass(warning.category, SkippedRow):
            print(f"mmpeft: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
