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
from mmpeft.lab.results import MetricMissing, group_means, summarize
from mmpeft.lab.sweep import (
    SweepError,
    check_sweep,
    config_fingerprint,
    device_slots,
    load_sweep,
    plan_stage1,
    plan_stage2,
    run_sweep,
    select,
)

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
    assert results.startswith("# sweep ") and "Made with `mmpeft sweep " in results and "mmpeft 0.1.0" in results


def test_group_means_and_both_vtab_means():
    rows = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 50.0, "e": 60.0}
    groups = {"a": "natural", "b": "natural", "c": "specialized", "d": "structured", "e": "structured"}
    means = group_means(rows, groups)
    assert means["natural"] == 15.0 and means["specialized"] == 40.0 and means["structured"] == 55.0
    assert means["mean(G)"] == pytest.approx((15 + 40 + 55) / 3) and means["mean(T)"] == 36.0


def test_published_vpt_deep_means():
    """VPT-deep's group means 78.48 / 82.43 / 54.98 give 71.96 as the mean of the groups (VPT's VTAB-1k table,
    Jia et al. 2022)."""
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
    sweep = load_sweep(tmp_path / "b.yaml")  # what the keys name is checked by check_sweep, all at once
    with pytest.raises(SweepError, match="2 problems, no cell ran: \\(1\\) unknown task 't' .*"
                       "\\(2\\) method 'm': config 'nope.yaml' does not exist$"):  # fmt: skip
        check_sweep(sweep)


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


def _fake_fit(monkeypatch, metrics_for, delay=lambda config: 0.0, legacy: bool = False, calls=None) -> list[str]:
    """Each cell's `mmpeft fit` writes summary.json with `metrics_for(lr, stage, seed)`; returns the run ids.

    legacy: the old format, with only `val_acc` / `test_acc` (no `metrics`). calls: a list that gets
    (run id, CUDA_VISIBLE_DEVICES or None, start, end) per cell."""
    real, ran = subprocess.Popen, []

    class FakeFit:
        """What the runner uses of a `subprocess.Popen`: the cell runs when started, `wait` gives its exit code."""

        def __init__(self, cmd, **kwargs):
            self.returncode = run(cmd, **kwargs)

        def wait(self, timeout=None) -> int:
            return self.returncode

    def run(cmd, **kwargs) -> int:
        config = yaml.safe_load(Path(cmd[-1]).read_text())
        lr, seed, stage = config["model"]["init_args"]["lr"], config["seed_everything"], config["run"]["tags"][-1]
        start = time.perf_counter()
        time.sleep(delay(config))
        if calls is not None:
            device = kwargs["env"].get("CUDA_VISIBLE_DEVICES")
            calls.append((config["run"]["name"], device, start, time.perf_counter()))
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
        return 0

    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: (FakeFit if "mmpeft.cli" in cmd else real)(cmd, **kw))
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
    from mmpeft.cli import main

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


# -- a cell's id hashes what defines it: config content, not paths ----------------------------------------


def _acc_by_lr(lr: float, stage: int, seed: int) -> dict[str, float]:
    return {"val/acc": lr, "test/acc": 0.5} if stage == 1 else {"test/acc": 0.6 + 0.01 * seed}


def _split_lora_config(folder: Path) -> Path:
    """configs/vtab/lora.yaml with its backbone in a file of its own that it refers to (as `mmpeft fit` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "configs/vtab/lora.yaml").read_text())
    (folder / "backbone.yaml").write_text(yaml.safe_dump(config["model"]["init_args"].pop("backbone")))
    config["model"]["init_args"]["backbone"] = "backbone.yaml"
    (folder / "lora.yaml").write_text("# LoRA, split\n" + yaml.safe_dump(config, sort_keys=False))
    return folder / "lora.yaml"


def test_config_fingerprint_is_content_not_path(tmp_path):
    lora = _split_lora_config(tmp_path / "a")
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer: {max_epochs: 3}\n")
    first = config_fingerprint([lora, extra])
    moved = _split_lora_config(tmp_path / "b")
    moved.write_text(moved.read_text().replace("# LoRA, split\n", "# another comment\n\n"))
    assert config_fingerprint([moved, extra]) == first, "another path, comments and layout: the same content"
    assert config_fingerprint([extra, lora]) != first, "the -c order is part of the content"
    assert config_fingerprint([lora]) != first
    extra.write_text("trainer: {max_epochs: 4}\n")
    assert config_fingerprint([lora, extra]) != first, "a second -c file's content"
    extra.write_text("trainer: {max_epochs: 3}\n")
    (tmp_path / "a/backbone.yaml").write_text((tmp_path / "a/backbone.yaml").read_text().replace("0.1", "0.2"))
    assert config_fingerprint([lora, extra]) != first, "a config the method's config refers to"
    assert config_fingerprint([tmp_path / "missing.yaml"]) != config_fingerprint([lora]), "a plan never crashes"


def test_a_config_file_an_override_names_counts_by_content(tmp_path):
    backbone = tmp_path / "backbone.yaml"
    backbone.write_text(yaml.safe_dump({"class_path": "mmpeft.backbones.TimmViT", "init_args": {"name": "test_vit"}}))
    path = _sweep_file(tmp_path, args={"model.init_args.backbone": str(backbone)})
    before = [c.id for c in plan_stage1(load_sweep(path))]
    backbone.write_text("# the same content\n" + backbone.read_text())
    assert [c.id for c in plan_stage1(load_sweep(path))] == before
    backbone.write_text(backbone.read_text().replace("test_vit", "vit_small_patch16_224"))
    after = [c.id for c in plan_stage1(load_sweep(path))]
    assert len(after) == len(before) == 2 * 2 * 3 and not set(after) & set(before)


def test_editing_a_method_config_reruns_exactly_its_cells(tmp_path, monkeypatch):
    ran = _fake_fit(monkeypatch, _acc_by_lr)
    lora, extra = _split_lora_config(tmp_path / "cfg"), tmp_path / "cfg/extra.yaml"
    extra.write_text("trainer: {max_epochs: 3}\n")
    linear = tmp_path / "cfg/linear.yaml"
    linear.write_text((REPO / "configs/vtab/linear.yaml").read_text())

    def sweep(linear_path: Path = linear) -> list[str]:
        ran.clear()
        methods = {"lora": [str(lora), str(extra)], "linear": str(linear_path)}
        run_sweep(_sweep_file(tmp_path, tasks=["eurosat"], methods=methods), log=lambda *_: None)
        return sorted(ran)

    assert len(sweep()) == 2 * (3 + 2)
    assert sweep() == [], "nothing changed: every cell is reused"
    lora.write_text("# a comment and another layout\n" + yaml.safe_dump(yaml.safe_load(lora.read_text())))
    moved = tmp_path / "elsewhere/linear.yaml"
    moved.parent.mkdir()
    moved.write_text(linear.read_text())
    assert sweep(moved) == [], "comments, layout and a moved file are not content"
    lora.write_text(lora.read_text().replace("warmup_epochs: 10", "warmup_epochs: 5"))
    _assert_only(sweep(moved), "lora")
    extra.write_text("trainer: {max_epochs: 4}\n")
    _assert_only(sweep(moved), "lora")  # the method's second -c file
    (tmp_path / "cfg/backbone.yaml").write_text((tmp_path / "cfg/backbone.yaml").read_text().replace("0.1", "0.2"))
    _assert_only(sweep(moved), "lora")  # a config the method's config refers to
    moved.write_text(moved.read_text().replace("max_epochs: 100", "max_epochs: 99"))
    _assert_only(sweep(moved), "linear")


def _assert_only(ran: list[str], method: str) -> None:
    """Exactly the cells of `method` ran (3 grid points in stage 1, 2 seeds in stage 2), and no other."""
    assert len(ran) == 5 and all(f"-{method}-seed" in x for x in ran), ran
    assert sum(x.startswith("s1-") for x in ran) == 3 and sum(x.startswith("s2-") for x in ran) == 2, ran


# -- ties: the first grid point, whatever order results were made in ---------------------------------------


def test_plan_stage2_ties_follow_the_grid_not_the_results_order(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, tasks=["eurosat"], seeds=[0]))
    results = [{"task": c.task, "method": c.method, "point": c.point, "val_acc": 0.5} for c in plan_stage1(sweep)]
    for order in (results, results[::-1], results[1:] + results[:1]):
        assert {c.point["model.init_args.lr"] for c in plan_stage2(sweep, order)} == {LRS[0]}
    sweep.search = {"model.init_args.lr": [LRS[2], LRS[0], LRS[1]]}  # the grid reordered: its new first point
    assert {c.point["model.init_args.lr"] for c in plan_stage2(sweep, results)} == {LRS[2]}


def test_ties_go_to_the_first_grid_point_when_results_come_from_an_earlier_run(tmp_path, monkeypatch):
    ran = _fake_fit(monkeypatch, lambda lr, stage, seed: {"val/acc": 0.5, "test/acc": 0.5},
                    delay=lambda config: 0.3 if config["model"]["init_args"]["lr"] == LRS[0] else 0.0)  # fmt: skip
    lora = {"lora": str(REPO / "configs/vtab/lora.yaml")}

    def sweep(lrs: list[float]) -> tuple[list[str], set[float]]:
        ran.clear()
        path = _sweep_file(tmp_path, tasks=["eurosat"], methods=lora, search={"model.init_args.lr": lrs}, parallel=2)
        run_sweep(path, log=lambda *_: None)
        cells = _cells(tmp_path / "out/fake")
        stage2 = {c["point"]["model.init_args.lr"] for c in cells.values() if c["stage"] == 2 and c["id"] in ran}
        return sorted(cells[x]["point"]["model.init_args.lr"] for x in ran if x.startswith("s1-")), stage2

    assert sweep([LRS[2], LRS[1]]) == ([LRS[1], LRS[2]], {LRS[2]}), "an earlier run, the grid reversed: its first"
    assert sweep(list(LRS)) == ([LRS[0]], {LRS[0]}), "two results from disk, the first point run now (and last)"
    assert sweep([LRS[1], LRS[0], LRS[2]]) == ([], {LRS[1]}), "every result from disk: the grid's order decides"


# -- GPUs: one per cell slot, cycling --------------------------------------------------------------------


def test_device_slots_cycle_over_the_visible_gpus():
    assert device_slots(4, 2) == ["0", "1", "0", "1"], "more cells than GPUs: they share, in turn"
    assert device_slots(2, 4) == ["0", "1"] and device_slots(1, 8) == ["0"], "one GPU per cell, not all of them"
    assert device_slots(3, 2, "3,5") == ["3", "5", "3"], "the ids of an existing CUDA_VISIBLE_DEVICES"
    assert device_slots(2, 1, "GPU-a1b2, GPU-c3d4") == ["GPU-a1b2", "GPU-a1b2"], "UUIDs; only those CUDA can use"
    assert device_slots(3, 0) == [None] * 3 and device_slots(2, 0, "") == [None] * 2, "no GPU: nothing is set"
    assert device_slots(0, 2) == ["0"]


@pytest.mark.parametrize(("gpus", "visible", "expected"), [(2, None, {"0", "1"}), (2, "4,6", {"4", "6"}),
                                                           (0, None, {None})])  # fmt: skip
def test_parallel_cells_run_on_different_gpus(tmp_path, monkeypatch, gpus, visible, expected):
    import mmpeft.lab.sweep.run

    monkeypatch.setattr(mmpeft.lab.sweep.run, "_gpu_count", lambda: gpus)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    calls: list = []
    _fake_fit(monkeypatch, _acc_by_lr, delay=lambda config: 0.2, calls=calls)
    lines: list[str] = []
    run_sweep(_sweep_file(tmp_path, tasks=["eurosat"], methods={"lora": str(REPO / "configs/vtab/lora.yaml")}),
              parallel=2, log=lines.append)  # fmt: skip
    assert len(calls) == 3 + 2 and {device for _, device, _, _ in calls} == expected
    if gpus:
        overlapping = [(a, b) for a in calls for b in calls if a[0] < b[0] and a[2] < b[3] and b[2] < a[3]]
        assert overlapping and all(a[1] != b[1] for a, b in overlapping), "cells running together share no GPU"
        assert f"2 cells at a time on CUDA_VISIBLE_DEVICES {', '.join(sorted(expected))}" in lines
    else:
        assert not any("CUDA_VISIBLE_DEVICES" in line for line in lines)


@pytest.mark.parametrize(("parallel", "user", "expected"), [(2, None, {"4"}), (3, None, {"2"}), (16, None, {"1"}),
                                                             (1, None, {None}), (2, "3", {"3"})])  # fmt: skip
def test_parallel_cells_on_the_cpu_share_its_cores(tmp_path, monkeypatch, parallel, user, expected):
    """Cells on the CPU get the cores divided among them (two cached-probe cells at once on two cores, each with
    a thread per core, ran 10x slower than one alone); a user's OMP_NUM_THREADS is kept."""
    import mmpeft.lab.sweep.run

    monkeypatch.setattr(mmpeft.lab.sweep.run, "_gpu_count", lambda: 0)
    monkeypatch.setattr(mmpeft.lab.sweep.run, "_cpu_count", lambda: 8)
    if user is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user)
    _fake_fit(monkeypatch, _acc_by_lr)
    fake, threads = subprocess.Popen, []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: (cmd[:1] != ["git"]  # the results header's git
                        and threads.append(kw["env"].get("OMP_NUM_THREADS"))) or fake(cmd, **kw))  # fmt: skip
    run_sweep(_sweep_file(tmp_path, tasks=["eurosat"], methods={"lora": str(REPO / "configs/vtab/lora.yaml")}),
              parallel=parallel, log=lambda *_: None)  # fmt: skip
    assert len(threads) == 3 + 2 and set(threads) == expected


# -- the whole sweep is checked before the first cell runs -------------------------------------------------


def test_every_problem_of_a_sweep_in_one_line_before_any_cell_runs(tmp_path, monkeypatch, capsys):
    ran = _fake_fit(monkeypatch, _acc_by_lr)
    lora = (REPO / "configs/vtab/lora.yaml").read_text()
    (tmp_path / "badname.yaml").write_text(lora.replace("name: lora, preset: paper", "name: loraa"))
    (tmp_path / "badopt.yaml").write_text(lora.replace("name: lora, preset: paper", "name: lora, rr: 8"))
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    methods = {
        "lora": str(REPO / "configs/vtab/lora.yaml"),
        "missing": str(tmp_path / "nope.yaml"),
        "badname": str(tmp_path / "badname.yaml"),
        "badopt": str(tmp_path / "badopt.yaml"),
        "broken": str(tmp_path / "broken.yaml"),
    }
    path = _sweep_file(
        tmp_path,
        tasks=["cifar10", "eurosat"],
        methods=methods,
        search={"model.init_args.lr": [0.1, 0.2], "model.init_args.weight_decy": [0.0]},
        args={"trainer.max_epoch": 3},
        overrides=[
            {"task": "eurosat", "method": "lora", "args": {"model.init_args.method": {"name": "lora", "alpah": 2}}},
            {"task": "dtdd", "args": {}},
            {"methdo": "lora"},
            {"method": "badname", "args": {"model.init_args.warmup_epochs": "many"}},
        ],
    )
    with pytest.raises(SweepError) as err:
        run_sweep(path, log=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: 11 problems, no cell ran: (1) ")
    point = "point {'model.init_args.lr': 0.1, 'model.init_args.weight_decy': 0.0}"
    for problem in (
        "overrides[2]: unknown keys ['methdo']; known: ['task', 'method', 'search', 'args']",
        "unknown task 'cifar10' (not in the 'vtab1k' dataset metadata; did you mean 'cifar'?)",
        "unknown task 'dtdd' in overrides[1] (not in the 'vtab1k' dataset metadata; did you mean 'dtd'?)",
        f"method 'broken': config '{tmp_path / 'broken.yaml'}' is not valid YAML (line 2): expected ','",
        f"method 'missing': config '{tmp_path / 'nope.yaml'}' does not exist",
        f"method 'badname' ({tmp_path / 'badname.yaml'}): model.init_args.method: unknown method 'loraa'",
        f"method 'badname' ({tmp_path / 'badname.yaml'}), task 'cifar10', {point}: model.warmup_epochs: Expected a "
        "float. Got value: many",
        f"method 'badopt' ({tmp_path / 'badopt.yaml'}): model.init_args.method: method 'lora' has no option(s) ['rr']",
        f"method 'lora' ({REPO / 'configs/vtab/lora.yaml'}), task 'eurosat', {point}: "
        "model.init_args.method: method 'lora' has no option(s) ['alpah']",
        "unknown key 'trainer.max_epoch' (method 'badname', 'badopt', 'lora'); did you mean 'trainer.max_epochs'?",
        "unknown key 'model.init_args.weight_decy' (method 'badname', 'badopt', 'lora'); "
        "did you mean 'model.init_args.weight_decay'?",
    ):
        assert problem in message, problem
    assert ran == [] and not (tmp_path / "out").exists(), "nothing ran, nothing was written"
    from mmpeft.cli import main

    assert main(["sweep", str(path)]) == 2 and ran == []
    assert capsys.readouterr().err == f"mmpeft: error: {message}\n"


def test_task_names_are_checked_against_the_sweeps_metadata(tmp_path):
    fgvc = {"linear": str(REPO / "configs/fgvc/linear.yaml")}

    def check(**keys) -> None:
        check_sweep(load_sweep(_sweep_file(tmp_path, methods=fgvc, **{"task_key": "data.init_args.dataset", **keys})))

    unknown = "unknown task 'cubb' \\(not in the 'fgvc' dataset metadata; did you mean 'cub'\\?\\)"
    with pytest.raises(SweepError, match=unknown):
        check(tasks=["cubb", "nabirds"], metadata="fgvc")
    check(tasks=["cub", "nabirds"], metadata="fgvc")
    check(tasks=["my_own_birds"], metadata=None)  # no metadata: any name
    with pytest.raises(SweepError, match="unknown key 'data.init_args.task' \\(method 'linear'\\); did you mean "
                                         "'data.init_args.dataset'\\?"):  # fmt: skip
        check(tasks=["cub"], metadata="fgvc", task_key="data.init_args.task")
    with pytest.raises(SweepError, match="metadata 'fgcv': .*fgcv.* \\(set `metadata: null` for tasks without"):
        check(tasks=["cub"], metadata="fgcv")


@pytest.mark.parametrize("name", ["vtab1k", "fgvc", "clip_fewshot", "smoke"])
def test_shipped_sweeps_check_out(name, monkeypatch):
    monkeypatch.chdir(REPO)  # their config paths are relative to the repository
    check_sweep(load_sweep(REPO / f"experiments/{name}.yaml"))


# -- Ctrl-C ------------------------------------------------------------------------------------------------

# `mmpeft sweep` with each cell's `mmpeft fit` replaced by a child that writes its summary at once for the first
# grid point and sleeps for the others (so Ctrl-C finds one cell done and one running).
CTRL_C_DRIVER = """
import json, sys, yaml
from pathlib import Path
import mmpeft.lab.sweep.run
from mmpeft.cli import main

CHILD = '''
import json, sys, time, yaml
from pathlib import Path
config = yaml.safe_load(Path(sys.argv[1]).read_text())
if config["model"]["init_args"]["lr"] != 0.1:
    time.sleep(120)
run = Path(config["run"]["dir"]) / config["run"]["name"] / "version_0"
run.mkdir(parents=True)
(run / "summary.json").write_text(json.dumps({"metrics": {"val/acc": 0.5}, "trainable": 1, "adapter": None}))
'''
real = mmpeft.lab.sweep.run.Runner.command
mmpeft.lab.sweep.run.Runner.command = lambda self, cell: [sys.executable, "-c", CHILD, real(self, cell)[-1]]
sys.exit(main(["sweep", sys.argv[1]]))
"""


def test_ctrl_c_stops_the_sweep_with_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, tasks=["eurosat"], methods={"lora": str(REPO / "configs/vtab/lora.yaml")})
    out = tmp_path / "out/fake"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DRIVER, str(path)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while len(_cells(out)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # the second cell's child has started (and sleeps)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the sweep and its running cell
    stdout, stderr = proc.communicate(timeout=180)  # generous: only a hang needs it (loaded machines took > 60 s)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == [
        f"mmpeft: sweep fake interrupted: stage 1: 1 of 3 cells done, their results kept in {out / 'cells'}; rerun "
        f"`mmpeft sweep {path}` to resume (only the missing cells run)"
    ]
    assert "Traceback" not in stdout and "FAILED" not in stdout
    ran = _fake_fit(monkeypatch, _acc_by_lr)
    lines: list[str] = []
    run_sweep(path, log=lines.append)
    assert "stage 1: 1 of 3 cells already done, skipped" in lines
    assert sorted(name.split("-")[0] for name in ran) == ["s1", "s1", "s2", "s2"]
