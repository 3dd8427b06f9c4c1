"""Sweep cells as submitit jobs (`--launcher local | slurm`): the same results as the in-process runner (attached and
detached), a task's stage 2 submitted as soon as its stage 1 is done, re-attachment to the jobs of an earlier sweep
process, a failed cell named with its log and last line while the others finish, Ctrl-C cancelling the jobs, a
pre-empted cell resuming from its checkpoint, and SLURM job parameters from the sweep file and the command line
(checked on submitit's own sbatch script, without a cluster).

The scheduling tests run on a scripted executor (`FakeCluster`): its jobs end when the test says so, writing the run
summary a cell's `mmpeft fit` would, so what is submitted when is checked without a cluster or a fit."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from submitit.slurm.slurm import _make_sbatch_string

from mmpeft.data.fixtures import write_vtab_fixture
from mmpeft.lab.sweep import SweepError, SweepInterrupted, load_sweep, run_sweep
from mmpeft.lab.sweep import launch as launch_module
from mmpeft.lab.sweep.jobs import CellJob, Ledger
from mmpeft.lab.sweep.launch import make_executor, resources, slurm_parameters

REPO = Path(__file__).resolve().parents[1]


def _sweep(tmp_path: Path, name: str, data: Path, **keys) -> Path:
    """experiments/smoke.yaml cut to one task, one search point and the linear probe (one fit per stage)."""
    spec = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())
    spec.update(
        name=name,
        data_root=str(data),
        out=str(tmp_path / "out"),
        tasks=["eurosat"],
        methods={"linear": str(REPO / "configs/vtab/linear.yaml")},
        search={"model.init_args.lr": [0.01]},
    )
    spec.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vtab")
    write_vtab_fixture(folder, ["eurosat", "kitti"])
    return folder


def _table(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def test_the_local_launcher_detached_gives_the_in_process_results(tmp_path, data):
    """A two-stage sweep (2 search points, then the winner retrained and tested): `--detach` submits and returns,
    each rerun collects and submits what follows, and the table is the in-process runner's."""
    two_points = {"model.init_args.lr": [0.001, 0.01]}
    run_sweep(_sweep(tmp_path, "inproc", data, search=two_points), log=lambda *_: None)
    path = _sweep(tmp_path, "jobs", data, search=two_points)
    lines: list[str] = []
    assert run_sweep(path, log=lines.append, launcher="local", detach=True) == "", "detached: returns at once"
    assert any("submitted 2 cells as local jobs" in line for line in lines)
    assert any(line.startswith("detached: 2 local jobs queued or running") for line in lines)
    ledger = Ledger(tmp_path / "out/jobs/jobs/submitted.json").entries
    assert sorted(e["stage"] for e in ledger.values()) == [1, 1], "the job ids are recorded in the results folder"
    deadline = time.monotonic() + 600  # generous: three short fits, on a loaded machine too
    while True:  # each rerun: progress, collect, submit the next
        rerun: list[str] = []
        if run_sweep(path, log=rerun.append, launcher="local", detach=True):
            break
        lines += rerun
        if time.monotonic() > deadline:
            pytest.fail(f"the detached sweep did not finish: {rerun}")
        time.sleep(2)  # a pass costs a fraction of a second: polling faster would take the jobs' CPU
    lines += rerun
    assert _table(tmp_path / "out/jobs/results.md") == _table(tmp_path / "out/inproc/results.md")
    assert sum("submitted 1 cells" in line for line in lines) == 1, "stage 2 submitted once, after stage 1"
    assert any("re-attached to 2 jobs" in line for line in lines), "a rerun finds the running jobs, not resubmits"
    assert "[stage 1: 2 done, 0 running, 0 failed, 0 queued] [stage 2: 1 done, 0 running, 0 failed, 0 queued]" in rerun
    assert len(Ledger(tmp_path / "out/jobs/jobs/submitted.json").entries) == 3, "each cell submitted once"
    assert list((tmp_path / "out/jobs/jobs").glob("*_result.pkl")), "submitit's job files are in the results folder"
    again: list[str] = []
    run_sweep(path, log=again.append, launcher="local")
    assert not any("submitted" in line for line in again), "a finished sweep submits nothing on a rerun"


class FakeJob:
    """A scripted job: running until the test ends it, then (like the cell's `mmpeft fit`) the run's summary."""

    def __init__(self, job_id: str, args: tuple):
        self.job_id, self.args = job_id, args
        self.outcome: int | Exception | None = None
        self.cancelled = False

    @property
    def cell(self) -> str:
        return Path(self.args[1]).stem  # the log is logs/<cell id>.log

    def finish(self) -> None:
        command = self.args[0]
        config = yaml.safe_load(Path(command[-1]).read_text())
        lr = config["model"]["init_args"]["lr"]
        version = Path(config["run"]["dir"]) / config["run"]["name"] / "version_0"
        version.mkdir(parents=True, exist_ok=True)
        metrics = {"val/acc": lr, "test/acc": 0.5 + lr}  # the larger learning rate wins stage 1
        (version / "summary.json").write_text(json.dumps({"metrics": metrics, "trainable": 10, "adapter": "a"}))
        self.outcome = 0

    def die(self) -> None:
        self.outcome = RuntimeError("job 7 was pre-empted and not requeued")

    def done(self) -> bool:
        return self.outcome is not None

    @property
    def state(self) -> str:
        return "RUNNING" if self.outcome is None else "FINISHED"

    def result(self) -> int:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True
        self.outcome = RuntimeError("cancelled")


class FakeCluster:
    """The executor and the scheduler's memory: `submit` queues a FakeJob, `lookup` finds it again by id."""

    def __init__(self):
        self.jobs: dict[str, FakeJob] = {}

    def submit(self, fn, *args) -> FakeJob:
        assert isinstance(fn, CellJob)
        job = FakeJob(str(len(self.jobs) + 1), args)
        self.jobs[job.job_id] = job
        return job

    def lookup(self, job_id: str) -> FakeJob:
        return self.jobs[job_id]

    def running(self, prefix: str = "") -> list[FakeJob]:
        return [j for j in self.jobs.values() if j.outcome is None and j.cell.startswith(prefix)]

    def options(self) -> dict:
        return {"executor": self, "reattach_job": self.lookup}


def test_a_tasks_stage_2_is_submitted_when_its_stage_1_is_done_not_after_the_grid(tmp_path, data):
    path = _sweep(tmp_path, "pipeline", data, tasks=["eurosat", "kitti"], search={"model.init_args.lr": [0.1, 0.2]})
    cluster = FakeCluster()

    def step() -> list[str]:
        lines: list[str] = []
        run_sweep(path, log=lines.append, launcher="slurm", detach=True, **cluster.options())
        return lines

    step()
    assert (
        sorted(j.cell.split("-seed")[0] for j in cluster.running())
        == ["s1-eurosat-linear"] * 2 + ["s1-kitti-linear"] * 2
    )
    for job in cluster.running("s1-eurosat"):
        job.finish()
    lines = step()
    assert [j.cell.split("-seed")[0] for j in cluster.running("s2")] == ["s2-eurosat-linear"], lines
    assert len(cluster.running("s1-kitti")) == 2, "kitti's stage 1 still runs while eurosat's stage 2 is submitted"
    assert "[stage 1: 2 done, 2 running, 0 failed, 0 queued] [stage 2: 0 done, 1 running, 0 failed, 1 queued]" in lines
    (s2,) = cluster.running("s2")
    assert yaml.safe_load(Path(s2.args[0][-1]).read_text())["model"]["init_args"]["lr"] == 0.2, "the selected point"
    for job in cluster.running():
        job.finish()
    step()
    assert [j.cell.split("-seed")[0] for j in cluster.running()] == ["s2-kitti-linear"]
    cluster.running()[0].finish()
    lines = step()
    assert len(cluster.jobs) == 6, "each cell submitted once"
    assert any("| kitti" in line for line in lines), lines
    table = (tmp_path / "out/pipeline/results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| linear"))
    assert row.count("70.00") == 6, f"both tasks at the selected point's test/acc (0.5 + 0.2): {table}"


def test_a_rerun_reattaches_to_running_jobs_and_resubmits_only_the_dead_ones(tmp_path, data):
    """The sweep process is gone (killed, or detached): its jobs are found from the ledger; one that finished is
    collected, one still running is waited for, one that died without a result is submitted again."""
    path = _sweep(tmp_path, "reattach", data, methods={"linear": str(REPO / "configs/vtab/linear.yaml"),
                                                       "linear2": str(REPO / "configs/vtab/linear.yaml")},
                  search={"model.init_args.lr": [0.1, 0.2]})  # fmt: skip
    cluster = FakeCluster()
    run_sweep(path, log=lambda *_: None, launcher="slurm", detach=True, **cluster.options())
    first = dict(cluster.jobs)
    assert len(first) == 4
    jobs = list(first.values())
    jobs[0].finish()
    jobs[1].die()
    lines: list[str] = []
    run_sweep(path, log=lines.append, launcher="slurm", detach=True, **cluster.options())
    assert any("re-attached to 3 jobs" in line for line in lines), lines
    resubmitted = [j for j in cluster.jobs.values() if j.job_id not in first]
    assert [j.cell for j in resubmitted] == [jobs[1].cell], "only the dead job's cell is submitted again"
    assert Ledger(tmp_path / "out/reattach/jobs/submitted.json").job(jobs[1].cell, "slurm") == resubmitted[0].job_id
    assert (tmp_path / "out/reattach/cells" / f"{jobs[0].cell}.json").is_file(), "the finished job is collected"


def test_ctrl_c_cancels_the_submitted_jobs_and_says_so(tmp_path, data, monkeypatch):
    path = _sweep(tmp_path, "interrupted", data, search={"model.init_args.lr": [0.1, 0.2]})
    cluster = FakeCluster()

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch_module.time, "sleep", interrupt)
    with pytest.raises(SweepInterrupted, match="cancelled 2 slurm jobs") as err:
        run_sweep(path, log=lambda *_: None, launcher="slurm", **cluster.options())
    assert "--launcher slurm" in str(err.value), "the rerun command keeps the launcher"
    assert all(job.cancelled for job in cluster.jobs.values())


def test_a_preempted_cell_saves_a_checkpoint_and_its_requeued_job_resumes_from_it(tmp_path, data):
    """What submitit does on pre-emption or the time limit, without a cluster: `checkpoint` is called while the cell
    runs (it stops the fit, which saves a checkpoint), and the requeued job (the returned call) resumes from it."""
    from mmpeft.lab.sweep.plan import plan_stage1
    from mmpeft.lab.sweep.run import Runner

    long_fit = {"trainer.max_epochs": 6, "trainer.enable_checkpointing": True}  # stopped after its first epoch
    sweep = load_sweep(_sweep(tmp_path, "preempted", data, search={"model.init_args.lr": [0.1, 0.2]},
                              args={**yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())["args"],
                                    **long_fit}))  # fmt: skip
    out = tmp_path / "out/preempted"
    cell = plan_stage1(sweep)[0]
    command, log = Runner(sweep, out).command(cell), out / "logs" / f"{cell.id}.log"
    job, codes = CellJob(), []
    thread = threading.Thread(target=lambda: codes.append(job(command, str(log), {})))
    thread.start()
    metrics = out / "runs" / cell.id / "version_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and "val/acc" in metrics.read_text()):
        time.sleep(0.2)
    requeued = job.checkpoint(command, str(log), {})
    thread.join(60)
    assert codes == [143], "the fit was stopped and saved a checkpoint"
    saved = requeued.args[3]
    assert saved and Path(saved).is_file() and "terminated" in Path(saved).name, requeued.args
    assert requeued.result() == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "job requeued: resuming from" in text and "Restored all states from the checkpoint" in text
    summaries = sorted((out / "runs" / cell.id).glob("version_*/summary.json"))
    assert summaries, "the resumed run wrote its summary"
    assert json.loads(summaries[-1].read_text())["metrics"]["val/acc"] is not None


def test_a_failed_cell_is_named_with_its_log_and_last_line_and_the_others_finish(tmp_path, data):
    methods = {"linear": str(REPO / "configs/vtab/linear.yaml"), "broken": str(REPO / "configs/vtab/linear.yaml")}
    path = _sweep(tmp_path, "failing", data, methods=methods,
                  overrides=[{"method": "broken", "args": {"model.init_args.optimizer": "nonsense"}}])  # fmt: skip
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="1 stage-2 cells failed .* the other cells finished"):
        run_sweep(path, log=lines.append, launcher="local")
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "eurosat/broken" in failed[0] and "(log " in failed[0]
    assert "unknown optimizer 'nonsense'" in failed[0], "the error's last line, not only the log's path"
    done = list((tmp_path / "out/failing/cells").glob("s2-eurosat-linear-*.json"))  # one point: no stage 1
    assert len(done) == 1, "the other cell finished"


def test_slurm_job_parameters_come_from_the_sweep_file_and_the_command_line(tmp_path, data):
    slurm = {"partition": "gpu", "gpus_per_cell": 2, "cpus_per_cell": 4, "mem_gb": 64, "account": "lab",
             "sbatch": {"qos": "high", "constraint": "a100"}}  # fmt: skip
    sweep = load_sweep(_sweep(tmp_path, "cluster", data, slurm=slurm))
    script = _make_sbatch_string(
        "cmd", tmp_path, **slurm_parameters(resources(sweep, ["partition=big", "time_min=30"]))
    )
    for flag in ("--partition=big", "--gpus-per-node=2", "--cpus-per-task=4", "--mem=64GB", "--time=30",
                 "--account=lab", "--qos=high", "--constraint=a100", "--nodes=1", "--ntasks-per-node=1"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in script, flag
    with pytest.raises(SweepError, match="unknown keys"):
        resources(sweep, ["gpus=1"])
    with pytest.raises(SweepError, match="KEY=VALUE"):
        resources(sweep, ["partition"])
    if shutil.which("srun") is None:
        with pytest.raises(SweepError, match="needs a SLURM cluster"):
            make_executor("slurm", tmp_path, resources(sweep))
