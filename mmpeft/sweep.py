"""`mmpeft sweep SWEEP.yaml`: tasks x methods x seeds x a search grid, with the two-stage protocol.

Stage 1 trains every search point on the tuning split (VTAB: train800) with the first seed and
selects the point with the best value of the sweep's `select` metric on validation (val200). Stage 2
retrains the chosen point on train+val for every seed and evaluates the test split once. The test
split never selects anything.

Any scalar metric a run logs can select and be reported (cells read it from their run's `summary.json`:
`metrics[name]`, or the legacy `val_acc` / `test_acc` keys of older summaries):

    select: {metric: val/acc, mode: max}   # the default; a diffusion sweep: {metric: val/fid, mode: min}
    report: test/acc                       # the default: the select metric with `val/` replaced by `test/`

A finished cell whose summary lacks the metric its stage needs stops the sweep at once with a one-line
error naming the metric, the cell and the metrics it has (a misspelt name should not cost a whole stage).

Each cell is one `mmpeft fit` in its own process (crash isolation, a fresh CUDA context), with its
log, run directory and adapter file kept. A cell is done when its result file exists, so a killed
sweep resumes where it stopped; a cell's id carries a hash of its arguments, so editing the sweep
file reruns exactly the cells it changes (`select` and `report` are not arguments: changing them
reuses every cell). Results: `cells.csv` (every cell, with the select and report metrics as columns
named by metric) and `results.md` (the report metric per task, mean ± std over seeds, parameters;
for accuracies also group means and both VTAB means, see `mmpeft.results`). Modality-agnostic: the
task and data-root keys are configurable, and groups come from the dataset metadata when known.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.errors import MmpeftError
from mmpeft.results import MetricMissing, is_accuracy, metric_label, metric_value, metrics_of, results_table

__all__ = [
    "Cell",
    "Sweep",
    "SweepError",
    "load_sweep",
    "plan_stage1",
    "plan_stage2",
    "select",
    "run_sweep",
    "add_sweep_arguments",
]

SELECT_DEFAULT = {"metric": "val/acc", "mode": "max"}
MODES = ("max", "min")


class SweepError(MmpeftError, ValueError):
    """A sweep file is malformed (unknown key, bad `select` mode, ...); the message names the key."""


@dataclass
class Cell:
    stage: int
    task: str
    method: str
    seed: int
    point: dict[str, Any]
    args: dict[str, Any]  # every dotted override this cell passes, point included
    config: str

    @property
    def id(self) -> str:
        digest = hashlib.sha1(json.dumps([self.config, self.args], sort_keys=True).encode()).hexdigest()[:8]
        return f"s{self.stage}-{self.task}-{self.method}-seed{self.seed}-{digest}"


@dataclass
class Sweep:
    name: str
    methods: dict[str, str]  # method label -> config file
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    search: dict[str, list] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    data_root: str | None = None
    task_key: str = "data.init_args.task"
    root_key: str = "data.init_args.root"
    protocol_key: str = "data.init_args.protocol"
    protocols: tuple[str, str] = ("tune", "final")
    metadata: str | None = "vtab1k"  # dataset metadata with task groups (None: no groups)
    out: str = "runs/sweeps"
    parallel: int = 1
    wandb: str = "auto"
    select: dict[str, str] = field(default_factory=lambda: dict(SELECT_DEFAULT))  # stage 1: metric and mode
    report: str | None = None  # stage 2's metric in results.md; None: `select.metric` with val/ -> test/

    def __post_init__(self) -> None:
        self.select = _selection(self.select)
        if self.report is None:
            self.report = _default_report(self.select["metric"])
        if not isinstance(self.report, str) or not self.report:
            raise SweepError(f"report must be a metric name such as 'test/acc', not {self.report!r}")

    def settings(self, task: str, method: str) -> tuple[dict[str, list], dict[str, Any]]:
        """(search grid, fixed args) for one (task, method): global, then matching overrides in order."""
        search, args = dict(self.search), dict(self.args)
        for rule in self.overrides:
            if rule.get("task", task) == task and rule.get("method", method) == method:
                search = dict(rule["search"]) if "search" in rule else search
                args.update(rule.get("args", {}))
        return search, args


def _selection(select: Any) -> dict[str, str]:
    """`select:` with its defaults filled in; a bad key or mode is an error naming it and what is allowed."""
    if not isinstance(select, Mapping):
        raise SweepError(f"select must be a mapping such as {{metric: val/acc, mode: max}}, not {select!r}")
    unknown = set(select) - set(SELECT_DEFAULT)
    if unknown:
        raise SweepError(f"select: unknown keys {sorted(unknown)}; known: {sorted(SELECT_DEFAULT)}")
    out = {**SELECT_DEFAULT, **select}
    if not isinstance(out["metric"], str) or not out["metric"]:
        raise SweepError(f"select.metric must be a metric name such as 'val/acc', not {out['metric']!r}")
    if out["mode"] not in MODES:
        raise SweepError(f"select.mode must be one of {', '.join(map(repr, MODES))}, not {out['mode']!r}")
    return out


def _default_report(metric: str) -> str:
    """val/x -> test/x: stage 2 trains on train+val, so only a test metric means anything there."""
    if not metric.startswith("val/"):
        raise SweepError(f"select.metric {metric!r} does not start with 'val/', so set `report:` (e.g. test/...)")
    return "test/" + metric.removeprefix("val/")


def load_sweep(path: str | Path) -> Sweep:
    raw = yaml.safe_load(Path(path).read_text())
    unknown = set(raw) - set(Sweep.__dataclass_fields__)
    if unknown:
        raise SweepError(f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(Sweep.__dataclass_fields__)}")
    try:
        sweep = Sweep(**raw)
    except SweepError as err:
        raise SweepError(f"{path}: {err}") from None
    for label, config in sweep.methods.items():
        if not Path(config).is_file():
            raise FileNotFoundError(f"{path}: config {config!r} of method {label!r} does not exist")
    return sweep


def _grid(search: Mapping[str, list]) -> list[dict[str, Any]]:
    keys = list(search)
    return [dict(zip(keys, values)) for values in itertools.product(*(search[k] for k in keys))] or [{}]


def _cell(sweep: Sweep, stage: int, task: str, method: str, seed: int, point: dict, fixed: dict) -> Cell:
    args = {**fixed, **point, sweep.task_key: task, sweep.protocol_key: sweep.protocols[stage - 1]}
    args["seed_everything"] = seed
    if sweep.data_root is not None:
        args[sweep.root_key] = sweep.data_root
    return Cell(stage, task, method, seed, point, args, sweep.methods[method])


def plan_stage1(sweep: Sweep) -> list[Cell]:
    """Every search point on the tuning split, first seed; (task, method) pairs with one point skip it."""
    cells = []
    for task, method in itertools.product(sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        points = _grid(search)
        if len(points) > 1:
            cells += [_cell(sweep, 1, task, method, sweep.seeds[0], p, fixed) for p in points]
    return cells


def _score(result: Mapping[str, Any], metric: str, mode: str) -> float:
    """Higher is better in both modes; NaN (a diverged run) ranks below every number."""
    value = metric_value(result, metric)
    if math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def select(
    results: list[dict[str, Any]], metric: str = "val/acc", mode: str = "max"
) -> dict[tuple[str, str], dict[str, Any]]:
    """Best point per (task, method): highest `metric` (mode max) or lowest (min); ties keep the earlier result.

    `Runner.run` returns results in grid order, so a tie goes to the earlier grid point."""
    best: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for r in results:
        key, score = (r["task"], r["method"]), _score(r, metric, mode)
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    return {key: r for key, (_, r) in best.items()}


def plan_stage2(sweep: Sweep, stage1: list[dict[str, Any]]) -> list[Cell]:
    chosen = select(stage1, sweep.select["metric"], sweep.select["mode"])
    cells = []
    for task, method in itertools.product(sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        point = chosen[(task, method)]["point"] if (task, method) in chosen else _grid(search)[0]
        cells += [_cell(sweep, 2, task, method, seed, point, fixed) for seed in sweep.seeds]
    return cells


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.init_args.lr": 0.1} -> {"model": {"init_args": {"lr": 0.1}}} (a config file LightningCLI merges)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


class Runner:
    """Runs cells in subprocesses, `parallel` at a time (one GPU each when there are enough)."""

    def __init__(self, sweep: Sweep, out: Path, log=print):
        self.sweep, self.out, self.log = sweep, out, log
        for sub in ("cells", "logs", "runs", "configs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.failed: list[str] = []
        self.missing: MetricMissing | None = None  # the first cell without its stage's metric stops the sweep

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.id}.json"

    def load(self, cell: Cell) -> dict[str, Any] | None:
        path = self.result_path(cell)
        return _result(cell, json.loads(path.read_text())) if path.is_file() else None

    def command(self, cell: Cell) -> list[str]:
        """`mmpeft fit -c <method config> -c <cell config>`; the cell config is kept for reproduction."""
        overrides = _nested(cell.args)
        overrides["run"] = {
            "dir": str(self.out / "runs"), "name": cell.id, "group": self.sweep.name, "wandb": self.sweep.wandb,
            "tags": [cell.method, cell.task, f"stage{cell.stage}"], "test_after_fit": cell.stage == 2,
        }  # fmt: skip
        overrides.setdefault("trainer", {})["enable_progress_bar"] = False
        path = self.out / "configs" / f"{cell.id}.yaml"
        path.write_text(yaml.safe_dump(overrides, sort_keys=False))
        return [sys.executable, "-m", "mmpeft.cli", "fit", "-c", cell.config, "-c", str(path)]

    def run_one(self, cell: Cell, device: str | None) -> dict[str, Any] | None:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        start = time.perf_counter()
        with open(self.out / "logs" / f"{cell.id}.log", "w") as log:
            done = subprocess.run(self.command(cell), stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            with self.lock:
                self.failed.append(cell.id)
            return None
        versions = sorted((self.out / "runs" / cell.id).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        summary = json.loads((versions[-1] / "summary.json").read_text())
        result = _result(cell, {**summary, "seconds": round(time.perf_counter() - start, 1)})
        tmp = self.result_path(cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.result_path(cell))  # atomic: a killed sweep never leaves a half-written result
        return result

    def run(self, cells: list[Cell], stage: int, metric: str | None = None) -> list[dict[str, Any]]:
        """Run the cells without a result file, `parallel` at a time; returns every cell's result in cell order.

        Cell order (not finishing order) keeps selection ties deterministic. `metric` is the one this stage
        needs: the first result without it raises `MetricMissing` and no further cell starts."""
        loaded = [(c, self.load(c)) for c in cells]
        results = [r for _, r in loaded if r is not None]
        todo = [c for c, r in loaded if r is None]
        if metric is not None:
            for r in results:
                metric_value(r, metric)
        if results:
            self.log(f"stage {stage}: {len(results)} of {len(cells)} cells already done, skipped")
        if not todo:
            return results
        devices: queue.Queue = queue.Queue()
        for device in self._devices():
            devices.put(device)
        durations: list[float] = []
        start = time.perf_counter()

        def work(cell: Cell) -> None:
            if self.missing is not None:
                return  # the sweep is stopping: its metric is missing
            device = devices.get()
            t0 = time.perf_counter()
            try:
                result = self.run_one(cell, device)
            except Exception as err:  # noqa: BLE001 - a broken cell must not stop the others
                self.log(f"cell {cell.id} failed in the runner: {err!r}")
                with self.lock:
                    self.failed.append(cell.id)
                result = None
            finally:
                devices.put(device)
            with self.lock:
                durations.append(time.perf_counter() - t0)
                if result is not None:
                    results.append(result)
                    self._check(result, metric)
                self._progress(stage, cell, result, len(durations), len(todo), durations)

        with ThreadPoolExecutor(max_workers=max(self.sweep.parallel, 1)) as pool:
            list(pool.map(work, todo))
        if self.missing is not None:
            raise self.missing
        self.log(f"stage {stage}: {len(todo)} cells in {(time.perf_counter() - start) / 60:.1f} min")
        order = {c.id: i for i, c in enumerate(cells)}
        return sorted(results, key=lambda r: order[r["id"]])

    def _check(self, result: dict[str, Any], metric: str | None) -> None:
        """Remember the first result without `metric` (the caller holds the lock)."""
        if metric is None or self.missing is not None:
            return
        try:
            metric_value(result, metric)
        except MetricMissing as err:
            self.missing = err

    def _progress(self, stage: int, cell: Cell, result: dict | None, done: int, total: int, durations: list) -> None:
        left = total - done
        running = min(max(self.sweep.parallel, 1), left)
        eta = sum(durations) / len(durations) * left / max(self.sweep.parallel, 1)
        if result is None:
            outcome = f"FAILED, see {self.out / 'logs' / cell.id}.log"
        else:
            found = metrics_of(result)
            metrics = dict.fromkeys((self.sweep.select["metric"], self.sweep.report))
            outcome = "ok " + " ".join(f"{k} {found[k]:.4f}" for k in metrics if k in found)
        self.log(
            f"[stage {stage}: {done}/{total} done, {running} running, {left} left, ETA {eta / 60:.1f} min] "
            f"{cell.task}/{cell.method} {cell.point or ''} {outcome}"
        )

    def _devices(self) -> list[str | None]:
        parallel = max(self.sweep.parallel, 1)
        try:
            import torch  # noqa: PLC0415

            gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            gpus = 0
        if gpus >= parallel > 1:
            return [str(i) for i in range(parallel)]
        return [None] * parallel


def _result(cell: Cell, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's result: its run's summary under the cell's own fields.

    The summary's `method` is the PEFT method's name (vpt), not the sweep's label (vpt_deep), so the
    cell's label must win or selection and results.md would merge methods that share a name."""
    return {**summary, **asdict(cell), "id": cell.id}


def write_results(sweep: Sweep, out: Path, stage1: list[dict], stage2: list[dict]) -> str:
    rows = stage1 + stage2
    metrics = list(dict.fromkeys((sweep.select["metric"], sweep.report)))  # columns named by metric
    columns = ["id", "stage", "task", "method", "seed", "point", *metrics, "trainable", "adapter", "seconds"]
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["stage"], r["task"], r["method"], r["seed"])):
            found = metrics_of(r)
            writer.writerow({**r, "point": json.dumps(r["point"]), **{m: found.get(m) for m in metrics}})
    groups = {}
    if sweep.metadata:
        from mmpeft.data.metadata import load_metadata  # noqa: PLC0415

        meta = load_metadata(sweep.metadata)
        groups = {t: v.get("group", "all") for t, v in meta.get("tasks", {}).items()}
    table = results_table(stage2, groups, sweep.report)
    means = (
        "mean(G) = mean of the group means, mean(T) = mean of the tasks"
        if is_accuracy(sweep.report)
        else "mean = mean of the tasks"
    )
    chosen = f"{'highest' if sweep.select['mode'] == 'max' else 'lowest'} {sweep.select['metric']}"
    header = (
        f"# sweep {sweep.name}\n\n{metric_label(sweep.report)} of the point with the {chosen} in stage 1, "
        f"mean ± std over {len(sweep.seeds)} seed(s); {means}; parameters include the head.\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    return header + table


def run_sweep(path: str | Path, parallel: int | None = None, log=print) -> str:
    sweep = load_sweep(path)
    if parallel:
        sweep.parallel = parallel
    out = Path(sweep.out) / sweep.name
    runner = Runner(sweep, out, log)
    start = time.perf_counter()
    stage1 = runner.run(plan_stage1(sweep), stage=1, metric=sweep.select["metric"])
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-1 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    stage2 = runner.run(plan_stage2(sweep, stage1), stage=2, metric=sweep.report)
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-2 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    table = write_results(sweep, out, stage1, stage2)
    log(f"\n{table}\nsweep {sweep.name}: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return table


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep file, e.g. experiments/vtab1k.yaml")
    p.add_argument("--parallel", type=int, default=None, help="cells at once (one GPU each when there are enough)")
