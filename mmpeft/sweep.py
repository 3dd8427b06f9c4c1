"""`mmpeft sweep SWEEP.yaml`: tasks x methods x seeds x a search grid, with the two-stage protocol.

Stage 1 trains every search point on the tuning split (VTAB: train800) with the first seed and
selects the point with the best validation accuracy (val200). Stage 2 retrains the chosen point on
train+val for every seed and evaluates the test split once. The test split never selects anything.

Each cell is one `mmpeft fit` in its own process (crash isolation, a fresh CUDA context), with its
log, run directory and adapter file kept. A cell is done when its result file exists, so a killed
sweep resumes where it stopped; a cell's id carries a hash of its arguments, so editing the sweep
file reruns exactly the cells it changes. Results: `cells.csv` (every cell) and `results.md`
(per-task top-1, group means, both VTAB means, mean ± std over seeds, parameters). Modality-agnostic:
the task and data-root keys are configurable, and groups come from the dataset metadata when known.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
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

from mmpeft.results import results_table

__all__ = ["Cell", "Sweep", "load_sweep", "plan_stage1", "plan_stage2", "run_sweep", "add_sweep_arguments"]


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

    def settings(self, task: str, method: str) -> tuple[dict[str, list], dict[str, Any]]:
        """(search grid, fixed args) for one (task, method): global, then matching overrides in order."""
        search, args = dict(self.search), dict(self.args)
        for rule in self.overrides:
            if rule.get("task", task) == task and rule.get("method", method) == method:
                search = dict(rule["search"]) if "search" in rule else search
                args.update(rule.get("args", {}))
        return search, args


def load_sweep(path: str | Path) -> Sweep:
    raw = yaml.safe_load(Path(path).read_text())
    unknown = set(raw) - set(Sweep.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(Sweep.__dataclass_fields__)}")
    sweep = Sweep(**raw)
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


def select(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Best point per (task, method) by validation accuracy; ties go to the earlier grid point."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        key = (r["task"], r["method"])
        if key not in best or r["val_acc"] > best[key]["val_acc"]:
            best[key] = r
    return best


def plan_stage2(sweep: Sweep, stage1: list[dict[str, Any]]) -> list[Cell]:
    chosen = select(stage1)
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

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.id}.json"

    def load(self, cell: Cell) -> dict[str, Any] | None:
        path = self.result_path(cell)
        return json.loads(path.read_text()) if path.is_file() else None

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
        result = {**asdict(cell), "id": cell.id, **summary, "seconds": round(time.perf_counter() - start, 1)}
        tmp = self.result_path(cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.result_path(cell))  # atomic: a killed sweep never leaves a half-written result
        return result

    def run(self, cells: list[Cell], stage: int) -> list[dict[str, Any]]:
        """Run the cells without a result file, `parallel` at a time; returns every cell's result."""
        loaded = [(c, self.load(c)) for c in cells]
        results = [r for _, r in loaded if r is not None]
        todo = [c for c, r in loaded if r is None]
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
                self._progress(stage, cell, result, len(durations), len(todo), durations)

        with ThreadPoolExecutor(max_workers=max(self.sweep.parallel, 1)) as pool:
            list(pool.map(work, todo))
        self.log(f"stage {stage}: {len(todo)} cells in {(time.perf_counter() - start) / 60:.1f} min")
        return results

    def _progress(self, stage: int, cell: Cell, result: dict | None, done: int, total: int, durations: list) -> None:
        left = total - done
        running = min(max(self.sweep.parallel, 1), left)
        eta = sum(durations) / len(durations) * left / max(self.sweep.parallel, 1)
        if result is None:
            outcome = f"FAILED, see {self.out / 'logs' / cell.id}.log"
        else:
            scores = [f"{k} {result[f'{k}_acc']:.4f}" for k in ("val", "test") if result.get(f"{k}_acc") is not None]
            outcome = "ok " + " ".join(scores)
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


def write_results(sweep: Sweep, out: Path, stage1: list[dict], stage2: list[dict]) -> str:
    rows = stage1 + stage2
    columns = [
        "id",
        "stage",
        "task",
        "method",
        "seed",
        "point",
        "val_acc",
        "test_acc",
        "trainable",
        "adapter",
        "seconds",
    ]
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["stage"], r["task"], r["method"], r["seed"])):
            writer.writerow({**r, "point": json.dumps(r["point"])})
    groups = {}
    if sweep.metadata:
        from mmpeft.data.metadata import load_metadata  # noqa: PLC0415

        meta = load_metadata(sweep.metadata)
        groups = {t: v.get("group", "all") for t, v in meta.get("tasks", {}).items()}
    table = results_table(stage2, groups)
    header = (
        f"# sweep {sweep.name}\n\nTop-1 on the test split (%) of the point chosen on validation, mean ± std over "
        f"{len(sweep.seeds)} seed(s); mean(G) = mean of the group means, mean(T) = mean of the tasks; parameters "
        "include the head.\n\n"
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
    stage1 = runner.run(plan_stage1(sweep), stage=1)
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-1 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    stage2 = runner.run(plan_stage2(sweep, stage1), stage=2)
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-2 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    table = write_results(sweep, out, stage1, stage2)
    log(f"\n{table}\nsweep {sweep.name}: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return table


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep file, e.g. experiments/vtab1k.yaml")
    p.add_argument("--parallel", type=int, default=None, help="cells at once (one GPU each when there are enough)")
