"""Sweep cells as jobs through submitit: `--launcher local` (submitit's local executor, one process per job) or
`--launcher slurm` (one SLURM job per cell), the same cells, result files and results table as the in-process runner.

The results folder is the only shared state: a job runs the cell's `mmpeft fit` and the sweep, which waits for its
jobs, collects each finished one into its result file, so a sweep killed or whose jobs died resumes by running the
same command again (only cells without a result file are submitted). Ctrl-C cancels the jobs it submitted.

Resources come from the sweep file's `slurm:` mapping, each overridable on the command line (`--slurm
partition=gpu`): `partition`, `gpus_per_cell`, `cpus_per_cell`, `mem_gb`, `time_min`, `account`, and `sbatch` (a
mapping of any other sbatch option, e.g. `{qos: high, constraint: a100}`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmpeft.lab import records
from mmpeft.lab.sweep.checks import check_sweep
from mmpeft.lab.sweep.plan import plan_stage1, plan_stage2
from mmpeft.lab.sweep.run import Runner, cpu_threads_per_cell, write_results
from mmpeft.lab.sweep.spec import Cell, Sweep, SweepError, SweepInterrupted, load_sweep

__all__ = ["LAUNCHERS", "SLURM_KEYS", "SubmititRunner", "add_sweep_arguments", "make_executor", "resources",
           "run_cell_job", "run_sweep", "slurm_parameters"]  # fmt: skip

LAUNCHERS = ("inprocess", "local", "slurm")
# sweep-file key -> submitit's SlurmExecutor parameter (its sbatch flag)
SLURM_KEYS = {
    "partition": "partition",
    "gpus_per_cell": "gpus_per_node",
    "cpus_per_cell": "cpus_per_task",
    "mem_gb": "mem",
    "time_min": "time",
    "account": "account",
    "sbatch": "additional_parameters",
}
SLURM_DEFAULTS = {"gpus_per_cell": 1, "cpus_per_cell": 8, "mem_gb": 32, "time_min": 240}
POLL_SECONDS = 2.0


def resources(sweep: Sweep, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The sweep file's `slurm:` mapping, defaults filled in, then `KEY=VALUE` overrides (values read as YAML)."""
    merged = {**SLURM_DEFAULTS, **(sweep.slurm or {})}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--slurm takes KEY=VALUE (e.g. partition=gpu), got {item!r}")
        merged[key.strip()] = yaml.safe_load(value)
    unknown = set(merged) - set(SLURM_KEYS)
    if unknown:
        raise SweepError(f"slurm: unknown keys {sorted(unknown)}; known: {sorted(SLURM_KEYS)}")
    if "sbatch" in merged and not isinstance(merged["sbatch"], Mapping):
        raise SweepError(f"slurm.sbatch must be a mapping of sbatch options, got {merged['sbatch']!r}")
    return merged


def slurm_parameters(res: Mapping[str, Any]) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one cell: one node, one task, the cell's GPUs and CPUs."""
    params = {SLURM_KEYS[k]: v for k, v in res.items() if v is not None}
    if "mem" in params:
        params["mem"] = f"{params['mem']}GB"
    params["additional_parameters"] = dict(params.get("additional_parameters", {}))
    return {"nodes": 1, "ntasks_per_node": 1, **params}


def make_executor(launcher: str, folder: Path, res: Mapping[str, Any]) -> Any:
    """A submitit executor writing its job files under `folder`: the local one, or SLURM's with `res`."""
    import submitit

    if launcher == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int(res.get("time_min") or SLURM_DEFAULTS["time_min"]))
        return executor
    if launcher == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=str(folder))
        except RuntimeError as err:  # submitit looks for `srun`
            raise SweepError(f"--launcher slurm needs a SLURM cluster ({err}); on one machine use --launcher local "
                             "or the default in-process runner") from None  # fmt: skip
        executor.update_parameters(**slurm_parameters(res))
        return executor
    raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")


def run_cell_job(command: list[str], log_path: str, env: dict[str, str]) -> int:
    """One cell, inside its job: `mmpeft fit` with its output in the cell's log; returns the exit status."""
    with open(log_path, "w") as log:
        done = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    return done.returncode


def last_line(path: Path) -> str:
    """The last non-empty line of a log (the error a failed cell ended with)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


class SubmititRunner(Runner):
    """`Runner`'s cells as submitit jobs: submits the cells without a result file, waits with a progress line
    (done / running / failed / queued), collects each finished job's summary into its result file."""

    def __init__(self, sweep: Sweep, out: Path, log=print, launcher: str = "local", res: Mapping | None = None):
        super().__init__(sweep, out, log)
        self.launcher = launcher
        self.executor = make_executor(launcher, out / "jobs", res or resources(sweep))
        self.devices = [None]  # the scheduler places each job; GPUs are the job's own

    def job_env(self) -> dict[str, str]:
        if self.launcher == "local":  # every job on this machine: share its cores as the in-process runner does
            threads = cpu_threads_per_cell(self.sweep.parallel, os.cpu_count() or 1, os.environ.get("OMP_NUM_THREADS"))
            return {"OMP_NUM_THREADS": threads} if threads else {}
        return {}

    def run(self, cells: list[Cell], stage: int, metric: str | None = None) -> list[dict[str, Any]]:
        results, todo = self.split_done(cells, stage, metric)
        if not todo:
            return results
        self._env, self._stage_start = self.job_env(), time.perf_counter()
        # the local executor starts every job it is given at once: `parallel` at a time; SLURM queues them itself
        limit = max(self.sweep.parallel, 1) if self.launcher == "local" else len(todo)
        waiting, pending = list(todo), {}
        try:
            results += self._wait(waiting, pending, limit, stage, metric)
        except KeyboardInterrupt:
            running = [job for _, job in pending.values() if not job.done()]
            for job in running:
                job.cancel(check=False)
            done = sum(self.result_path(c).is_file() for c in cells)
            raise SweepInterrupted(f"stage {stage}: {done} of {len(cells)} cells done; cancelled {len(running)} "
                                   f"{self.launcher} jobs") from None  # fmt: skip
        if self.missing is not None:
            raise self.missing
        order = {c.id: i for i, c in enumerate(cells)}
        return sorted(results, key=lambda r: order[r["id"]])

    def _submit(self, cell: Cell) -> Any:
        log = self.out / "logs" / f"{cell.id}.log"
        return self.executor.submit(run_cell_job, self.command(cell), str(log), self._env)

    def _wait(self, waiting: list[Cell], pending: dict, limit: int, stage: int,
              metric: str | None) -> list[dict[str, Any]]:  # fmt: skip
        """Submit up to `limit` jobs at a time, collect each one that ends, one progress line per change."""
        results, last = [], None
        while waiting or pending:
            fresh = []
            while waiting and len(pending) < limit and self.missing is None:
                cell = waiting.pop(0)
                pending[cell.id] = (cell, self._submit(cell))
                fresh.append(str(pending[cell.id][1].job_id))
            if fresh:
                more = ", ..." if len(fresh) > 3 else ""
                self.log(f"stage {stage}: submitted {len(fresh)} cells as {self.launcher} jobs ({', '.join(fresh[:3])}"
                         f"{more}); job files in {self.out / 'jobs'}")  # fmt: skip
            for cell_id, (cell, job) in list(pending.items()):
                if not job.done():
                    continue
                del pending[cell_id]
                result = self._finish(cell, job, time.perf_counter() - self._stage_start)
                if result is not None:
                    results.append(result)
                    self._check(result, metric)
            if self.missing is not None:
                waiting.clear()
            running = sum(job.state == "RUNNING" for _, job in pending.values())
            line = (f"[stage {stage}: {len(results)} done, {running} running, {len(self.failed)} failed, "
                    f"{len(pending) - running + len(waiting)} queued]")  # fmt: skip
            if line != last:
                self.log(line)
                last = line
            if waiting or pending:
                time.sleep(POLL_SECONDS)
        return results

    def _finish(self, cell: Cell, job: Any, seconds: float) -> dict[str, Any] | None:
        log = self.out / "logs" / f"{cell.id}.log"
        try:
            code = job.result()
        except Exception as err:  # the job itself died (time limit, pre-emption, node failure)
            code, why = 1, f"job {job.job_id} ended: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
        else:
            why = last_line(log)
        if code != 0:
            self.failed.append(cell.id)
            self.log(f"{cell.task}/{cell.method} {cell.point or ''} FAILED (log {log}): {why}")
            return None
        return self.collect(cell, seconds)


def run_sweep(path: str | Path, parallel: int | None = None, log=print, launcher: str = "inprocess",
              slurm: Sequence[str] = ()) -> str:  # fmt: skip
    """Plan, run (in this process's subprocesses, or as submitit jobs: `launcher`), select, retrain, tabulate."""
    sweep = load_sweep(path)
    if parallel:
        sweep.parallel = parallel
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    res = resources(sweep, slurm)  # a bad `slurm:` key is refused before anything runs
    check_sweep(sweep, path)  # every problem at once, before anything is written or run
    out = Path(sweep.out) / sweep.name
    runner = Runner(sweep, out, log) if launcher == "inprocess" else SubmititRunner(sweep, out, log, launcher, res)
    if any(runner.devices):
        log(f"{len(runner.devices)} cells at a time on CUDA_VISIBLE_DEVICES {', '.join(map(str, runner.devices))}")
    start = time.perf_counter()
    try:
        stage1 = runner.run(plan_stage1(sweep), stage=1, metric=sweep.select["metric"])
        if runner.failed:
            raise RuntimeError(
                f"{len(runner.failed)} stage-1 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}"
            )
        stage2 = runner.run(plan_stage2(sweep, stage1), stage=2, metric=sweep.report)
    except SweepInterrupted as err:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted: {err}, their results kept in {out / 'cells'}; rerun "
            f"`mmpeft sweep {path}` to resume (only the missing cells run)"
        ) from None
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-2 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    table = write_results(sweep, out, stage1, stage2, records.command_line("mmpeft sweep", [str(path)]))
    log(f"\n{table}\nsweep {sweep.name}: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return table


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep file, e.g. experiments/vtab1k.yaml")
    p.add_argument("--parallel", type=int, default=None, help="cells at once, spread over the visible GPUs")
    p.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                   help="inprocess: cells as subprocesses of this command (default); local: submitit's local "
                        "executor; slurm: one SLURM job per cell through submitit")  # fmt: skip
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="override a `slurm:` resource of the sweep file, e.g. partition=gpu, time_min=600")  # fmt: skip
