"""Sweep cells as submitit jobs (`--launcher local | slurm`): the same results as the in-process runner, a failed cell
named with its log and last line while the others finish, and SLURM job parameters from the sweep file and the
command line (checked on submitit's own sbatch script, without a cluster)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from submitit.slurm.slurm import _make_sbatch_string

from mmpeft.data.fixtures import write_vtab_fixture
from mmpeft.lab.sweep import SweepError, load_sweep, run_sweep
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
    write_vtab_fixture(folder, ["eurosat"])
    return folder


def _table(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def test_the_local_launcher_gives_the_in_process_results(tmp_path, data):
    run_sweep(_sweep(tmp_path, "inproc", data), log=lambda *_: None)
    lines: list[str] = []
    run_sweep(_sweep(tmp_path, "jobs", data), log=lines.append, launcher="local")
    assert _table(tmp_path / "out/jobs/results.md") == _table(tmp_path / "out/inproc/results.md")
    assert any("submitted 1 cells as local jobs" in line for line in lines)
    assert any("[stage 2: 1 done, 0 running, 0 failed, 0 queued]" in line for line in lines)
    assert list((tmp_path / "out/jobs/jobs").iterdir()), "submitit's job files are kept in the results folder"
    again: list[str] = []
    run_sweep(_sweep(tmp_path, "jobs", data), log=again.append, launcher="local")
    assert not any("submitted" in line for line in again), "a finished sweep submits nothing on a rerun"


def test_a_failed_cell_is_named_with_its_log_and_last_line_and_the_others_finish(tmp_path, data):
    methods = {"linear": str(REPO / "configs/vtab/linear.yaml"), "broken": str(REPO / "configs/vtab/linear.yaml")}
    path = _sweep(tmp_path, "failing", data, methods=methods,
                  overrides=[{"method": "broken", "args": {"model.init_args.optimizer": "nonsense"}}])  # fmt: skip
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="1 stage-2 cells failed"):
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
