"""The sweep runner: two-stage protocol end to end on fixture data, resume after a kill, aggregation, and
selection / reporting on any metric (with `mmpeft fit` faked by writing summary.json files by hand)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmpeft.data.fixtures import write_vtab_fixture
from mmpeft.results import MetricMissing, group_means, summarize
from mmpeft.sweep import SweepError, load_sweep, plan_stage1, plan_stage2, run_sweep, select

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """experiments/smoke.yaml pointed at fresh fixture folders and a temporary output directory."""
    tmp = tmp_path_factory.mktemp("sweep")
    write_vtab_fixture(tmp / "data", ["eurosat", "kitti"])
    spec = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())
    spec.update(data_root=str(tmp / "data"), out=str(tmp / "out"))
    spec["methods"] = {k: str(REPO / v) for k, v in spec["methods"].items()}
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def test_plan_two_tasks_two_methods_two_points(smoke):
    sweep = load_sweep(smoke)
    stage1 = plan_stage1(sweep)
    assert len(stage1) == 2 * 2 * 2 and {c.args["data.init_args.protocol"] for c in stage1} == {"tune"}
    assert len({c.id for c in stage1}) == 8
    fake = [{"task": c.task, "method": c.method, "point": c.point, "val_acc": c.point["model.init_args.lr"]}
            for c in stage1]  # fmt: skip
    stage2 = plan_stage2(sweep, fake)
    assert len(stage2) == 4 and {c.args["data.init_args.protocol"] for c in stage2} == {"final"}
    assert all(c.point == {"model.init_args.lr": 0.01} for c in stage2)


def test_killed_sweep_resumes_only_the_missing_cells(smoke):
    out = Path(yaml.safe_load(smoke.read_text())["out"]) / "smoke"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "sweep", str(smoke)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while len(_cells(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 3 <= len(before) < 12, "killed midway"
    lines: list[str] = []
    table = run_sweep(smoke, log=lines.append)
    assert any(f"stage 1: {sum(n.startswith('s1') for n in before)} of 8 cells already done, skipped" in x
               for x in lines)  # fmt: skip
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(after) == 12
    assert all(after[name] == mtime for name, mtime in before.items()), "finished cells were not rerun"
    assert "| lora |" in table and "mean(G)" in table


def test_stage1_selects_on_val_and_stage2_tests_once(smoke):
    out = Path(yaml.safe_load(smoke.read_text())["out"]) / "smoke"
    run_sweep(smoke, log=lambda *_: None)  # everything is done: nothing reruns
    cells = _cells(out)
    stage1 = [c for c in cells.values() if c["stage"] == 1]
    stage2 = [c for c in cells.values() if c["stage"] == 2]
    assert all(c["test_acc"] is None for c in stage1), "the test split is never touched in stage 1"
    assert all(c["test_acc"] is not None for c in stage2)
    best = select(stage1)
    for c in stage2:
        assert c["point"] == best[(c["task"], c["method"])]["point"]
        assert Path(c["adapter"]).is_file(), "each cell's adapter file is kept"
    for c in cells.values():
        assert (out / "logs" / f"{c['id']}.log").is_file() and (out / "configs" / f"{c['id']}.yaml").is_file()
    assert (out / "cells.csv").read_text().count("\n") == 13
    results = (out / "results.md").read_text()
    assert "eurosat" in results and "specialized" in results and "structured" in results


def test_group_means_and_both_vtab_means():
    rows = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 50.0, "e": 60.0}
    groups = {"a": "natural", "b": "natural", "c": "specialized", "d": "structured", "e": "structured"}
    means = group_means(rows, groups)
    assert means["natural"] == 15.0 and means["specialized"] == 40.0 and means["structured"] == 55.0
    assert means["mean(G)"] == pytest.approx((15 + 40 + 55) / 3) and means["mean(T)"] == 36.0


def test_published_vpt_deep_means():
    """VPT-deep's group means 78.48 / 82.43 / 54.98 give 71.96 as the mean of the groups (spec §6 item 9)."""
    means = group_means({"n": 78.48, "s": 82.43, "t": 54.98}, {"n": "natural", "s": "specialized", "t": "structured"})
    assert round(means["mean(G)"], 2) == 71.96
    natural = [78.8, 90.8, 65.8, 98.0, 88.3, 78.1, 49.6]  # VPT-deep's per-task Natural row
    assert round(group_means(dict(enumerate(natural)), {})["all"], 2) == 78.49


def test_summary_mean_and_std_over_seeds():
    rows = [{"method": "m", "task": "t", "seed": s, "test_acc": acc, "trainable": 100} for s, acc in
            ((0, 0.5), (1, 0.7))]  # fmt: skip
    (row,) = summarize(rows, {"t": "natural"})
    assert row["t"] == "60.00 ± 14.14" and row["mean(T)"] == "60.00" and row["params"] == "100"


def test_selection_ties_go_to_the_earlier_point():
    results = [{"task": "t", "method": "m", "point": {"lr": p}, "val_acc": 0.5} for p in (1, 2)]
    assert select(results)[("t", "m")]["point"] == {"lr": 1}


def test_bad_sweep_files(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "x", "methods": {}, "tasks": [], "seedz": [1]}))
    with pytest.raises(ValueError, match="unknown sweep keys \\['seedz'\\]"):
        load_sweep(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"name": "x", "methods": {"m": "nope.yaml"}, "tasks": ["t"]}))
    with pytest.raises(FileNotFoundError, match="config 'nope.yaml' of method 'm' does not exist"):
        load_sweep(tmp_path / "b.yaml")


def test_shipped_sweeps_plan_with_the_papers_settings():
    vtab = load_sweep(REPO / "experiments/vtab1k.yaml")
    assert len(vtab.tasks) == 19 and vtab.seeds == [42, 44, 82, 100, 800]
    stage2 = {(c.task, c.method, c.seed): c for c in plan_stage2(vtab, [])}
    ssf = stage2[("clevr_dist", "ssf", 42)].args
    assert ssf["model.init_args.lr"] == 0.05 and ssf["model.init_args.backbone.init_args.drop_path_rate"] == 0.1
    assert stage2[("svhn", "vpt_deep", 42)].args["model.init_args.method"]["length"] == 50
    assert not [c for c in plan_stage1(vtab) if c.method in ("ssf", "mosa", "lora")], "fixed recipes: no search"
    structured = [c for c in plan_stage1(vtab) if c.method == "vpt_deep"]
    assert {c.task for c in structured} == {t for t in vtab.tasks if t in (
        "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
        "smallnorb_ele")}  # fmt: skip
    fgvc = load_sweep(REPO / "experiments/fgvc.yaml")
    assert fgvc.task_key == "data.init_args.dataset" and plan_stage1(fgvc)


# -- any metric: `mmpeft fit` faked by a summary.json written by hand ----------------------------------------

LRS = (0.1, 0.2, 0.3)
FID = {0.1: 20.0, 0.2: 10.0, 0.3: 30.0}  # neither the lowest nor the highest is the first grid point


def _fake_fit(monkeypatch, metrics_for, delay=lambda config: 0.0, legacy: bool = False) -> list[str]:
    """Each cell's `mmpeft fit` writes summary.json with `metrics_for(lr, stage, seed)`; returns the run ids.

    legacy: the old format, with only `val_acc` / `test_acc` (no `metrics`)."""
    real, ran = subprocess.run, []

    def run(cmd, **kwargs):
        if "mmpeft.cli" not in cmd:
            return real(cmd, **kwargs)
        config = yaml.safe_load(Path(cmd[-1]).read_text())
        lr, seed, stage = config["model"]["init_args"]["lr"], config["seed_everything"], config["run"]["tags"][-1]
        time.sleep(delay(config))
        metrics = metrics_for(lr, int(stage[-1]), seed)
        summary = {"method": "some_peft_name", "monitor": "val/acc", "monitor_mode": "max", "metrics": metrics,
                   "val_acc": metrics.get("val/acc"), "test_acc": metrics.get("test/acc"), "trainable": 1234,
                   "adapter": None}  # fmt: skip
        if legacy:
            summary = {k: v for k, v in summary.items() if k not in ("metrics", "monitor", "monitor_mode")}
        run_dir = Path(config["run"]["dir"]) / config["run"]["name"] / "version_0"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        ran.append(config["run"]["name"])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return ran


def _sweep_file(tmp_path: Path, **keys) -> Path:
    methods = {"vpt_deep": str(REPO / "configs/vtab/vpt_deep.yaml"), "lora": str(REPO / "configs/vtab/lora.yaml")}
    spec = {"name": "fake", "out": str(tmp_path / "out"), "tasks": ["eurosat", "kitti"], "seeds": [0, 1],
            "methods": methods, "search": {"model.init_args.lr": list(LRS)}, "wandb": "disabled", **keys}  # fmt: skip
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _fid(lr: float, stage: int, seed: int) -> dict[str, float]:
    if stage == 1:
        return {"val/fid": FID[lr], "val/loss": 1.0}
    return {"test/fid": 100 * lr + seed, "test/loss": 1.0}


@pytest.mark.parametrize(("mode", "lr", "word"), [("min", 0.2, "lowest"), ("max", 0.3, "highest")])
def test_sweep_selects_and_reports_any_metric(tmp_path, monkeypatch, mode, lr, word):
    _fake_fit(monkeypatch, _fid)
    path = _sweep_file(tmp_path, select={"metric": "val/fid", "mode": mode})
    run_sweep(path, log=lambda *_: None)
    cells = _cells(tmp_path / "out/fake")
    stage2 = [c for c in cells.values() if c["stage"] == 2]
    assert len(stage2) == 2 * 2 * 2 and {c["method"] for c in stage2} == {"vpt_deep", "lora"}, "labels, not names"
    assert all(c["point"] == {"model.init_args.lr": lr} for c in stage2)
    csv_lines = (tmp_path / "out/fake/cells.csv").read_text().splitlines()
    assert csv_lines[0] == "id,stage,task,method,seed,point,val/fid,test/fid,trainable,adapter,seconds"
    results = (tmp_path / "out/fake/results.md").read_text()
    assert f"test/fid of the point with the {word} val/fid in stage 1" in results and "(%)" not in results
    mean = f"{100 * lr + 0.5:.4g}"  # seeds 0 and 1 add 0 and 1: not scaled by 100
    assert "| method | eurosat | kitti | mean | params |" in results and "mean(G)" not in results
    assert f"| vpt_deep | {mean} ± 0.7071 | {mean} ± 0.7071 | {mean} | 1.23K |" in results


@pytest.mark.parametrize("legacy", [False, True])
def test_accuracy_sweep_reads_new_and_legacy_summaries(tmp_path, monkeypatch, legacy):
    def acc(lr: float, stage: int, seed: int) -> dict[str, float]:
        if stage == 1:
            return {"val/acc": {0.1: 0.5, 0.2: 0.6, 0.3: 0.7}[lr], "val/loss": 1.0}
        return {"test/acc": 0.6 + 0.01 * seed, "test/loss": 1.0}

    ran = _fake_fit(monkeypatch, acc, legacy=legacy)
    run_sweep(_sweep_file(tmp_path), log=lambda *_: None)
    assert len(ran) == 2 * 2 * 3 + 2 * 2 * 2
    stage2 = [c for c in _cells(tmp_path / "out/fake").values() if c["stage"] == 2]
    assert all(c["point"] == {"model.init_args.lr": 0.3} for c in stage2)
    assert all(("metrics" in c) != legacy for c in stage2)
    results = (tmp_path / "out/fake/results.md").read_text()
    assert "test/acc (%) of the point with the highest val/acc in stage 1" in results
    assert "mean(G) = mean of the group means" in results
    assert "| lora | 60.50 ± 0.71 | 60.50 ± 0.71 | 60.50 | 60.50 | 60.50 | 60.50 | 1.23K |" in results
    header = (tmp_path / "out/fake/cells.csv").read_text().splitlines()[0]
    assert header == "id,stage,task,method,seed,point,val/acc,test/acc,trainable,adapter,seconds"


def test_select_min_max_ties_and_nan():
    rows = [{"task": "t", "method": "m", "point": {"lr": lr}, "metrics": {"val/loss": loss}}
            for lr, loss in ((1, 0.5), (2, 0.2), (3, 0.9), (4, 0.2))]  # fmt: skip
    assert select(rows, "val/loss", "min")[("t", "m")]["point"] == {"lr": 2}, "the smallest; ties keep the first"
    assert select(rows, "val/loss", "max")[("t", "m")]["point"] == {"lr": 3}
    diverged = [{**rows[0], "metrics": {"val/loss": math.nan}}, *rows[1:]]
    assert select(diverged, "val/loss", "min")[("t", "m")]["point"] == {"lr": 2}, "NaN is never the best"
    assert select(diverged, "val/loss", "max")[("t", "m")]["point"] == {"lr": 3}
    legacy = [{"task": "t", "method": "m", "point": {"lr": lr}, "val_acc": acc} for lr, acc in ((1, 0.4), (2, 0.6))]
    assert select(legacy)[("t", "m")]["point"] == {"lr": 2}
    assert select(legacy, "val/acc", "min")[("t", "m")]["point"] == {"lr": 1}


def test_stage1_ties_go_to_the_first_grid_point_whatever_finishes_first(tmp_path, monkeypatch):
    _fake_fit(monkeypatch, lambda lr, stage, seed: {"val/acc": 0.5, "test/acc": 0.5},
              delay=lambda config: 0.5 if config["model"]["init_args"]["lr"] == LRS[0] else 0.0)  # fmt: skip
    path = _sweep_file(tmp_path, tasks=["eurosat"], methods={"lora": str(REPO / "configs/vtab/lora.yaml")}, parallel=2)
    run_sweep(path, log=lambda *_: None)
    stage2 = [c for c in _cells(tmp_path / "out/fake").values() if c["stage"] == 2]
    assert stage2 and all(c["point"] == {"model.init_args.lr": LRS[0]} for c in stage2)


def test_missing_metric_stops_the_sweep_with_one_line(tmp_path, monkeypatch, capsys):
    ran = _fake_fit(monkeypatch, _fid)
    path = _sweep_file(tmp_path, select={"metric": "val/fdi", "mode": "min"}, report="test/fid")
    with pytest.raises(MetricMissing) as err:
        run_sweep(path, log=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"metric 'val/fdi' is not in the summary of cell {ran[0]};")
    assert message.endswith("it has: val/fid, val/loss") and ran[0].startswith("s1-eurosat-lora-seed0-")
    assert len(ran) == 1, "no further cell starts"
    from mmpeft.cli import main  # noqa: PLC0415

    assert main(["sweep", str(path)]) == 2, "the stored cell fails the rerun before anything runs"
    assert capsys.readouterr().err.strip() == f"mmpeft: error: {message}" and len(ran) == 1


def test_bad_select_and_report(tmp_path):
    def load(**keys):
        return load_sweep(_sweep_file(tmp_path, **keys))

    with pytest.raises(SweepError, match="select.mode must be one of 'max', 'min', not 'maximize'"):
        load(select={"metric": "val/acc", "mode": "maximize"})
    with pytest.raises(SweepError, match="select: unknown keys \\['goal'\\]; known: \\['metric', 'mode'\\]"):
        load(select={"metric": "val/acc", "goal": "max"})
    with pytest.raises(SweepError, match="select.metric 'fid' does not start with 'val/', so set `report:`"):
        load(select={"metric": "fid", "mode": "min"})
    sweep = load(select={"metric": "fid", "mode": "min"}, report="test_fid")
    assert sweep.select == {"metric": "fid", "mode": "min"} and sweep.report == "test_fid"
    sweep = load(select={"mode": "min"})
    assert sweep.select == {"metric": "val/acc", "mode": "min"} and sweep.report == "test/acc"
    assert load().select == {"metric": "val/acc", "mode": "max"} and load().report == "test/acc"
