"""Running a sweep: the cells in parallel (devices and CPU threads divided among them), resumable from the
finished ones, then the results table."""

from __future__ import annotations

import csv
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from mmpeft.lab import records
from mmpeft.lab.results import MetricMissing, is_accuracy, metric_label, metric_value, metrics_of, results_table
from mmpeft.lab.sweep.checks import nested
from mmpeft.lab.sweep.spec import Cell, Sweep, SweepInterrupted


def device_slots(parallel: int, gpus: int, visible: str | None = None) -> list[str | None]:
    """The `CUDA_VISIBLE_DEVICES` of each of the `parallel` cell slots: the GPUs in turn, cycling when there are
    more slots than GPUs; None (nothing set) without a GPU.

    gpus: `torch.cuda.device_count()`; visible: the sweep's own `CUDA_VISIBLE_DEVICES`, whose ids (numbers or
    UUIDs) are the ones handed out, since a child's ids are read through it. `device_slots(4, 2)` is
    ["0", "1", "0", "1"]; `device_slots(2, 2, "2,5")` is ["2", "5"]; `device_slots(3, 0)` is [None] * 3."""
    parallel = max(parallel, 1)
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else []
    ids = ids[:gpus] if ids else [str(i) for i in range(gpus)]  # CUDA stops at the first id it cannot use
    if gpus <= 0 or not ids:
        return [None] * parallel
    return [ids[k % len(ids)] for k in range(parallel)]


def cpu_threads_per_cell(parallel: int, cpus: int, omp_env: str | None) -> str | None:
    """The `OMP_NUM_THREADS` of a cell that runs on the CPU: the machine's cores shared among the `parallel`
    cells (at least one each), unless the user set `OMP_NUM_THREADS` (None: keep theirs). Without it every cell
    starts one thread per core and `parallel` cells oversubscribe the cores: two cached-probe cells at once on two
    cores ran 10x slower than one alone (142 s against 13 s), their threads spinning against each other."""
    if omp_env or parallel <= 1:
        return None
    return str(max(1, cpus // parallel))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch, or a broken driver: run on the CPU
        return 0


class Runner:
    """Runs cells in subprocesses, `parallel` at a time, each slot on its own GPU (`device_slots`)."""

    def __init__(self, sweep: Sweep, out: Path, log=print):
        self.sweep, self.out, self.log = sweep, out, log
        self.devices = device_slots(sweep.parallel, _gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        for sub in ("cells", "logs", "runs", "configs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False  # set by Ctrl-C: no cell starts, the running ones are stopped, none counts as failed
        self.failed: list[str] = []
        self.missing: MetricMissing | None = None  # the first cell without its stage's metric stops the sweep

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.id}.json"

    def load(self, cell: Cell) -> dict[str, Any] | None:
        path = self.result_path(cell)
        return _result(cell, json.loads(path.read_text())) if path.is_file() else None

    def command(self, cell: Cell) -> list[str]:
        """`mmpeft fit -c <method config> -c <cell config>`; the cell config is kept for reproduction."""
        overrides = nested(cell.args)
        overrides["run"] = {
            "dir": str(self.out / "runs"), "name": cell.id, "group": self.sweep.name, "wandb": self.sweep.wandb,
            "tags": [cell.method, cell.task, f"stage{cell.stage}"], "test_after_fit": cell.stage == 2,
        }  # fmt: skip
        overrides.setdefault("trainer", {})["enable_progress_bar"] = False
        path = self.out / "configs" / f"{cell.id}.yaml"
        path.write_text(yaml.safe_dump(overrides, sort_keys=False))
        configs = [a for config in cell.configs for a in ("-c", config)]
        return [sys.executable, "-m", "mmpeft.cli", "fit", *configs, "-c", str(path)]

    def run_one(self, cell: Cell, device: str | None) -> dict[str, Any] | None:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        else:
            threads = cpu_threads_per_cell(self.sweep.parallel, _cpu_count(), os.environ.get("OMP_NUM_THREADS"))
            if threads is not None:
                env["OMP_NUM_THREADS"] = threads
        start = time.perf_counter()
        with open(self.out / "logs" / f"{cell.id}.log", "w") as log:
            if self.stopping:
                return None
            process = subprocess.Popen(self.command(cell), stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.running.add(process)
                stopped = self.stopping  # Ctrl-C came while it started: `_stop_running` did not see it
            if stopped:
                process.terminate()
            try:
                returncode = process.wait()
            finally:
                with self.lock:
                    self.running.discard(process)
        if returncode != 0:
            with self.lock:
                if not self.stopping:  # a cell stopped by Ctrl-C has not failed: the rerun runs it again
                    self.failed.append(cell.id)
            return None
        return self.collect(cell, time.perf_counter() - start)

    def collect(self, cell: Cell, seconds: float) -> dict[str, Any]:
        """A finished cell's result file from its run's summary (written atomically: a killed sweep never leaves a
        half-written result)."""
        versions = sorted((self.out / "runs" / cell.id).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        summary = json.loads((versions[-1] / "summary.json").read_text())
        result = _result(cell, {**summary, "seconds": round(seconds, 1)})
        tmp = self.result_path(cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.result_path(cell))
        return result

    def split_done(self, cells: list[Cell], stage: int, metric: str | None) -> tuple[list[dict], list[Cell]]:
        """(results of the cells done already, each checked for `metric`; the cells still to run)."""
        loaded = [(c, self.load(c)) for c in cells]
        results = [r for _, r in loaded if r is not None]
        if metric is not None:
            for r in results:
                metric_value(r, metric)
        if results:
            self.log(f"stage {stage}: {len(results)} of {len(cells)} cells already done, skipped")
        return results, [c for c, r in loaded if r is None]

    def run(self, cells: list[Cell], stage: int, metric: str | None = None) -> list[dict[str, Any]]:
        """Run the cells without a result file, `parallel` at a time; returns every cell's result in cell order.

        Cell order (not finishing order) keeps selection ties deterministic. `metric` is the one this stage
        needs: the first result without it raises `MetricMissing` and no further cell starts."""
        results, todo = self.split_done(cells, stage, metric)
        if not todo:
            return results
        devices: queue.Queue = queue.Queue()
        for device in self.devices:
            devices.put(device)
        durations: list[float] = []
        start = time.perf_counter()

        def work(cell: Cell) -> None:
            if self.missing is not None or self.stopping:
                return  # the sweep is stopping: its metric is missing, or Ctrl-C
            device = devices.get()
            t0 = time.perf_counter()
            try:
                result = self.run_one(cell, device)
            except Exception as err:  # a broken cell must not stop the others
                self.log(f"cell {cell.id} failed in the runner: {err!r}")
                with self.lock:
                    self.failed.append(cell.id)
                result = None
            finally:
                devices.put(device)
            with self.lock:
                if self.stopping:
                    return
                durations.append(time.perf_counter() - t0)
                if result is not None:
                    results.append(result)
                    self._check(result, metric)
                self._progress(stage, cell, result, len(durations), len(todo), durations)

        with ThreadPoolExecutor(max_workers=max(self.sweep.parallel, 1)) as pool:
            try:
                list(pool.map(work, todo))
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                self._stop_running()
        if self.stopping:  # the pool has waited for the running cells to end
            done = sum(self.result_path(c).is_file() for c in cells)  # a cell may have ended as Ctrl-C came
            raise SweepInterrupted(f"stage {stage}: {done} of {len(cells)} cells done")
        if self.missing is not None:
            raise self.missing
        self.log(f"stage {stage}: {len(todo)} cells in {(time.perf_counter() - start) / 60:.1f} min")
        order = {c.id: i for i, c in enumerate(cells)}
        return sorted(results, key=lambda r: order[r["id"]])

    def _stop_running(self, grace: float = 10.0) -> None:
        """Ctrl-C: start no cell, and end the running ones (a terminal's Ctrl-C reached them too; a signal sent to
        the sweep alone did not), each left without a result file, so the rerun runs it again."""
        with self.lock:
            self.stopping = True
            running = list(self.running)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                process.terminate()

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


def _result(cell: Cell, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's result: its run's summary under the cell's own fields.

    The summary's `method` is the PEFT method's name (vpt), not the sweep's label (vpt_deep), so the
    cell's label must win or selection and results.md would merge methods that share a name."""
    return {**summary, **asdict(cell), "id": cell.id}


def write_results(sweep: Sweep, out: Path, stage1: list[dict], stage2: list[dict], command: str = "") -> str:
    """`cells.csv` (every cell) and `results.md` (stage 2 as a table, headed like every lab result file: the
    command, date, versions and commit)."""
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
        from mmpeft.data.metadata import load_metadata

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
        f"# sweep {sweep.name}\n\n{records.made_with(command or f'mmpeft sweep {sweep.name}')}.\n\n"
        f"{metric_label(sweep.report)} of the point with the {chosen} in stage 1, "
        f"mean ± std over {len(sweep.seeds)} seed(s); {means}; parameters include the head.\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    return header + table
