"""The sweep runner: two-stage protocol end to end on fixture data, resume after a kill, aggregation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmpeft.data.fixtures import write_vtab_fixture
from mmpeft.results import group_means, summarize
from mmpeft.sweep import load_sweep, plan_stage1, plan_stage2, run_sweep, select

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
