"""Sweep cells as jobs through submitit: `--launcher local` (submitit's local executor, one process per job) or
`--launcher slurm` (one SLURM job per cell), the same cells, result files and results table as the in-process runner.

The results folder is the only shared state. A job runs the cell's `mmpeft fit` (`jobs.CellJob`); the sweep waits
for its jobs and collects each finished one into its result file, and a task's stage 2 is submitted as soon as that
task's stage 1 is done. A sweep killed, or whose jobs died, resumes by running the same command again: cells with a
result file are skipped, jobs still queued or running are re-attached from the ledger (`jobs/submitted.json`), and
only the rest is submitted. `--detach` submits and exits, and each rerun reports, collects and submits what follows.
A pre-empted or timed-out job saves a checkpoint and is requeued to resume from it. Ctrl-C cancels the jobs.

Resources come from the sweep file's `slurm:` mapping, each overridable on the command line (`--slurm
partition=gpu`): `partition`, `gpus_per_cell`, `cpus_per_cell`, `mem_gb`, `time_min`, `account`, and `sbatch` (a
mapping of any other sbatch option, e.g. `{qos: high, constraint: a100}`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmpeft.lab import records
from mmpeft.lab.sweep.checks import check_sweep
from mmpeft.lab.sweep.jobs import CellJob, Ledger, reattach
from mmpeft.lab.sweep.plan import plan_stage1, plan_stage2
from mmpeft.lab.sweep.run import Runner, cpu_threads_per_cell, write_results
from mmpeft.lab.sweep.spec import Cell, Sweep, SweepError, SweepInterrupted, load_sweep

__all__ = ["LAUNCHERS", "SLURM_KEYS", "SubmititRunner", "add_sweep_arguments", "make_executor", "resources",
           "run_sweep", "slurm_parameters"]  # fmt: skip

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


def last_line(path: Path) -> str:
    """The last non-empty line of a log (the error a failed cell ended with)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


class SubmititRunner(Runner):
    """`Runner`'s cells as submitit jobs, both stages as one queue: submits the cells without a result file, a task's
    stage-2 cells as soon as its stage-1 cells are done (not after the whole grid), waits with a progress line
    (done / running / failed / queued per stage), collects each finished job into its result file. `detach`:
    submit and return; the next run re-attaches to the jobs in the ledger, collects and submits what follows."""

    def __init__(self, sweep: Sweep, out: Path, log=print, launcher: str = "local", res: Mapping | None = None,
                 detach: bool = False, executor: Any = None, reattach_job: Any = None):  # fmt: skip
        super().__init__(sweep, out, log)
        self.launcher, self.detach = launcher, detach
        self.executor = executor or make_executor(launcher, out / "jobs", res or resources(sweep))
        self.reattach_job = reattach_job or (lambda job_id: reattach(launcher, out / "jobs", job_id))
        self.ledger = Ledger(out / "jobs" / "submitted.json")
        self.devices = [None]  # the scheduler places each job; GPUs are the job's own

    def job_env(self) -> dict[str, str]:
        if self.launcher == "local":  # every job on this machine: share its cores as the in-process runner does
            threads = cpu_threads_per_cell(self.sweep.parallel, os.cpu_count() or 1, os.environ.get("OMP_NUM_THREADS"))
            return {"OMP_NUM_THREADS": threads} if threads else {}
        return {}

    def run_stages(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """(stage-1 results, stage-2 results) in cell order; None when detached before the sweep was done."""
        sweep = self.sweep
        stage1 = plan_stage1(sweep)
        self.cells1 = {task: [c for c in stage1 if c.task == task] for task in sweep.tasks}
        self.cells2: dict[str, list[Cell]] = {}
        self.results: dict[int, dict[str, dict[str, Any]]] = {1: {}, 2: {}}
        self.totals = {1: len(stage1), 2: len(sweep.tasks) * len(sweep.methods) * len(sweep.seeds)}
        self.queue: list[Cell] = []
        self.pending: dict[str, tuple[Cell, Any]] = {}
        self._env, self._start = self.job_env(), time.perf_counter()
        self._enqueue(stage1, 1)
        try:
            finished = self._drive()
        except KeyboardInterrupt:
            running = [job for _, job in self.pending.values() if not job.done()]
            for job in running:
                job.cancel(check=False)
            done = sum(len(r) for r in self.results.values())
            raise SweepInterrupted(f"{done} cells done; cancelled {len(running)} {self.launcher} jobs") from None
        if self.missing is not None:
            raise self.missing
        if not finished:
            return None
        planned2 = [c for task in sweep.tasks for c in self.cells2.get(task, [])]
        return ([self.results[1][c.id] for c in stage1 if c.id in self.results[1]],
                [self.results[2][c.id] for c in planned2 if c.id in self.results[2]])  # fmt: skip

    def _drive(self) -> bool:
        """Collect, plan the tasks whose stage 1 is done, submit, report; until nothing is left (True) or, when
        detached, once everything that can be submitted is (False unless the sweep was done)."""
        last, limit = None, max(self.sweep.parallel, 1) if self.launcher == "local" else None
        while True:
            self._settle()
            self._submit(limit)
            line = self._progress_line()
            if line != last:
                self.log(line)
                last = line
            if not self.queue and not self.pending:
                return True
            if self.detach:
                jobs = ", ".join(str(job.job_id) for _, job in list(self.pending.values())[:3])
                more = ", ..." if len(self.pending) > 3 else ""
                self.log(f"detached: {len(self.pending)} {self.launcher} jobs queued or running ({jobs}{more}), "
                         f"{len(self.queue)} cells not yet submitted; run the same command again to see progress, "
                         "collect the finished cells and submit the next ones")  # fmt: skip
                return False
            if self.missing is not None and not self.pending:
                return True
            time.sleep(POLL_SECONDS)

    def _settle(self) -> None:
        """Collect the finished jobs and plan the tasks they complete, until no pending job is finished (a planned
        task's stage-2 cells may re-attach to jobs that finished already)."""
        while True:
            self._collect()
            self._plan_stage2()
            if self.missing is not None or not any(job.done() for _, job in self.pending.values()):
                return

    def _enqueue(self, cells: list[Cell], stage: int) -> None:
        """Cells done already go to the results; cells whose earlier job is still queued, running or finished
        well are re-attached; the rest wait for submission (stage 2 first: it completes a task)."""
        metric = self.sweep.select["metric"] if stage == 1 else self.sweep.report
        done, todo = self.split_done(cells, stage, metric)
        for result in done:
            self.results[stage][result["id"]] = result
        fresh, attached = [], 0
        for cell in todo:
            job_id = self.ledger.job(cell.id, self.launcher)
            job = self.reattach_job(job_id) if job_id is not None else None
            if job is not None and (not job.done() or _succeeded(job)):
                self.pending[cell.id] = (cell, job)
                attached += 1
            else:
                fresh.append(cell)
        if attached:
            self.log(f"stage {stage}: re-attached to {attached} jobs submitted earlier (ledger "
                     f"{self.ledger.path})")  # fmt: skip
        self.queue = fresh + self.queue if stage == 2 else self.queue + fresh

    def _plan_stage2(self) -> None:
        """Plan each task whose stage-1 cells all have a result (a task without a search plans at once)."""
        for task in self.sweep.tasks:
            if task in self.cells2 or any(c.id not in self.results[1] for c in self.cells1[task]):
                continue
            stage1 = [self.results[1][c.id] for c in self.cells1[task]]
            self.cells2[task] = plan_stage2(self.sweep, stage1, tasks=[task])
            self._enqueue(self.cells2[task], 2)

    def _submit(self, limit: int | None) -> None:
        fresh = []
        while self.queue and (limit is None or len(self.pending) < limit) and self.missing is None:
            cell = self.queue.pop(0)
            log = self.out / "logs" / f"{cell.id}.log"
            job = self.executor.submit(CellJob(), self.command(cell), str(log), self._env)
            self.pending[cell.id] = (cell, job)
            self.ledger.record(cell.id, self.launcher, job.job_id, cell.stage)
            fresh.append(str(job.job_id))
        if fresh:
            more = ", ..." if len(fresh) > 3 else ""
            self.log(f"submitted {len(fresh)} cells as {self.launcher} jobs ({', '.join(fresh[:3])}{more}); job "
                     f"files in {self.out / 'jobs'}")  # fmt: skip

    def _collect(self) -> None:
        for cell_id, (cell, job) in list(self.pending.items()):
            if not job.done():
                continue
            del self.pending[cell_id]
            result = self._finish(cell, job, time.perf_counter() - self._start)
            if result is not None:
                self.results[cell.stage][cell.id] = result
                self._check(result, self.sweep.select["metric"] if cell.stage == 1 else self.sweep.report)
        if self.missing is not None:
            self.queue.clear()

    def _progress_line(self) -> str:
        parts = []
        for stage in (1, 2):
            running = sum(job.state == "RUNNING" for c, job in self.pending.values() if c.stage == stage)
            done, failed = len(self.results[stage]), sum(f.startswith(f"s{stage}-") for f in self.failed)
            queued = self.totals[stage] - done - running - failed
            parts.append(f"[stage {stage}: {done} done, {running} running, {failed} failed, {queued} queued]")
        return " ".join(parts)

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


def _succeeded(job: Any) -> bool:
    """A finished job whose cell ran to the end (a failed or cancelled one is submitted again)."""
    try:
        return job.result() == 0
    except Exception:
        return False


def run_sweep(path: str | Path, parallel: int | None = None, log=print, launcher: str = "inprocess",
              slurm: Sequence[str] = (), detach: bool = False, **runner_options: Any) -> str:  # fmt: skip
    """Plan, run (in this process's subprocesses, or as submitit jobs: `launcher`), select, retrain, tabulate.

    `detach` (submitit launchers): submit what can be submitted and return "" unless the sweep is done; the same
    call again reports progress, collects the finished cells and submits the next ones. `runner_options` go to
    `SubmititRunner` (tests pass an executor)."""
    sweep = load_sweep(path)
    if parallel:
        sweep.parallel = parallel
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if detach and launcher == "inprocess":
        raise SweepError("--detach needs jobs that outlive this command: add --launcher slurm (or local)")
    res = resources(sweep, slurm)  # a bad `slurm:` key is refused before anything runs
    check_sweep(sweep, path)  # every problem at once, before anything is written or run
    out = Path(sweep.out) / sweep.name
    rerun = f"`mmpeft sweep {path}{'' if launcher == 'inprocess' else f' --launcher {launcher}'}`"
    start = time.perf_counter()
    try:
        if launcher == "inprocess":
            stages = _run_in_process(Runner(sweep, out, log), sweep, out, log)
        else:
            runner = SubmititRunner(sweep, out, log, launcher, res, detach=detach, **runner_options)
            stages = runner.run_stages()
            if stages is None:
                return ""
            if runner.failed:
                counts = {s: sum(f.startswith(f"s{s}-") for f in runner.failed) for s in (1, 2)}
                what = ", ".join(f"{n} stage-{s} cells failed" for s, n in counts.items() if n)
                raise RuntimeError(f"{what} (logs in {out / 'logs'}): {runner.failed[:3]}; the other cells "
                                   f"finished; fix and rerun {rerun}")  # fmt: skip
    except SweepInterrupted as err:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted: {err}, their results kept in {out / 'cells'}; rerun {rerun} to resume "
            "(only the missing cells run)"
        ) from None
    table = write_results(sweep, out, *stages, records.command_line("mmpeft sweep", [str(path)]))
    log(f"\n{table}\nsweep {sweep.name}: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return table


def _run_in_process(runner: Runner, sweep: Sweep, out: Path, log) -> tuple[list[dict], list[dict]]:
    """Stage 1 on the whole grid, then stage 2, each cell a subprocess of this command."""
    if any(runner.devices):
        log(f"{len(runner.devices)} cells at a time on CUDA_VISIBLE_DEVICES {', '.join(map(str, runner.devices))}")
    stage1 = runner.run(plan_stage1(sweep), stage=1, metric=sweep.select["metric"])
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-1 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    stage2 = runner.run(plan_stage2(sweep, stage1), stage=2, metric=sweep.report)
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-2 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    return stage1, stage2


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep file, e.g. experiments/vtab1k.yaml")
    p.add_argument("--parallel", type=int, default=None, help="cells at once, spread over the visible GPUs")
    p.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                   help="inprocess: cells as subprocesses of this command (default); local: submitit's local "
                        "executor; slurm: one SLURM job per cell through submitit")  # fmt: skip
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="override a `slurm:` resource of the sweep file, e.g. partition=gpu, time_min=600")  # fmt: skip
    p.add_argument("--detach", action="store_true",
                   help="with --launcher slurm|local: submit and exit; the same command again reports progress, "
                        "collects the finished cells and submits the next ones")  # fmt: skip
