"""A sweep cell as a submitit job, and the ledger that lets a later `mmpeft sweep` find the jobs an earlier one
submitted.

- `CellJob` runs the cell's `mmpeft fit` inside its job. It is submitit-checkpointable: when SLURM pre-empts the job
  or its time limit nears (submitit's signal, 90 s before the end), submitit calls `checkpoint`, which stops the fit
  with SIGTERM (the fit saves a resumable checkpoint and exits 143, `mmpeft.cli`), and the job is requeued under the
  same id to continue from that checkpoint with `--ckpt_path`: a pre-empted cell loses at most the batch it was on.
- `Ledger` (`jobs/submitted.json` in the results folder): cell id -> launcher, job id, stage. A detached sweep exits
  after submitting; running it again re-attaches to the jobs still queued or running and to the ones that finished
  (collected, not rerun), and submits only the cells whose job ended without a result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission
from submitit.local.local import LocalJob

__all__ = ["CellJob", "DetachedLocalJob", "Ledger", "reattach", "resumable_checkpoint"]

STOP_SECONDS = 60.0  # how long a stopped fit may take to write its checkpoint before it is killed
_SAVED = re.compile(r"a resumable checkpoint is at (\S+)")


def resumable_checkpoint(log: Path) -> str | None:
    """The checkpoint a SIGTERM-stopped `mmpeft fit` names in its log (the last one, if it was stopped twice)."""
    try:
        found = _SAVED.findall(log.read_text(errors="replace"))
    except OSError:
        return None
    return found[-1] if found else None


def _ignore_job_signals() -> None:
    """In the fit's process: SLURM signals every process of the job, and submitit's USR2 (whose default action
    is to terminate) must reach only the job's own process, which stops the fit cleanly in `checkpoint`."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class CellJob(Checkpointable):
    """One cell inside its job: `command` (the cell's `mmpeft fit`) with its output in `log_path`; returns the exit
    status. `resume_from`: a checkpoint to continue from (set by `checkpoint` for the requeued job)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __call__(self, command: list[str], log_path: str, env: dict[str, str], resume_from: str | None = None) -> int:
        args = [*command, "--ckpt_path", resume_from] if resume_from else command
        with open(log_path, "a" if resume_from else "w") as log:
            if resume_from:
                log.write(f"\n[mmpeft sweep] job requeued: resuming from {resume_from}\n")
                log.flush()
            # preexec_fn is safe here: the job's process runs no threads of its own
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                            preexec_fn=_ignore_job_signals)  # noqa: PLW1509  # fmt: skip
            # poll, not wait(): submitit calls `checkpoint` from a signal handler in this thread, and a handler
            # cannot wait for a process while the interrupted wait() holds its lock
            while (code := self.process.poll()) is None:
                time.sleep(0.5)
        return code

    def checkpoint(self, command: list[str], log_path: str, env: dict[str, str],
                   resume_from: str | None = None) -> DelayedSubmission:  # fmt: skip
        """Stop the running fit (it saves a checkpoint) and return the requeued job's call: resume from it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.poll() is None:
                process.kill()
        saved = resumable_checkpoint(Path(log_path)) or resume_from
        return DelayedSubmission(CellJob(), command, log_path, env, saved)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # no such process
        return False


class DetachedLocalJob(LocalJob):
    """A local job submitted by an earlier sweep process: running while its controller process (whose pid is the
    job id) lives, finished once its result file exists, interrupted otherwise."""

    def get_info(self, mode: str = "force") -> dict[str, str]:
        if self.paths.result_pickle.exists():
            return {"jobState": "FINISHED"}
        return {"jobState": "RUNNING" if _pid_alive(int(self.job_id)) else "INTERRUPTED"}

    def cancel(self, check: bool = True) -> None:
        if _pid_alive(int(self.job_id)):
            os.kill(int(self.job_id), signal.SIGINT)


def reattach(launcher: str, folder: Path, job_id: str) -> Any:
    """The submitit job `job_id` of an earlier sweep process (its files are in `folder`)."""
    if launcher == "slurm":
        from submitit import SlurmJob

        return SlurmJob(folder=folder, job_id=job_id)
    return DetachedLocalJob(folder=folder, job_id=job_id)


class Ledger:
    """cell id -> {launcher, job, stage}: the jobs this results folder's sweep submitted (written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, cell_id: str, launcher: str, job_id: str, stage: int) -> None:
        self.entries[cell_id] = {"launcher": launcher, "job": str(job_id), "stage": stage}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        tmp.replace(self.path)

    def job(self, cell_id: str, launcher: str) -> str | None:
        entry = self.entries.get(cell_id)
        return entry["job"] if entry and entry["launcher"] == launcher else None
