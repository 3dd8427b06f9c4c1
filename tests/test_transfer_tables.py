"""k-shot subsets of the quickstart data and the k-shot transfer tables (`python -m mmpeft.quickstart --shots`, a
sweep file per task), with the cells' runs faked: no training here."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from mmpeft.data.digits import DigitsDataModule
from mmpeft.data.shapes import ShapesDataModule
from mmpeft.lab import transfer as q
from mmpeft.lab.sweep.checks import check_sweep
from mmpeft.lab.sweep.plan import plan_stage2
from mmpeft.lab.sweep.run import Runner, _result


def _keys(images: torch.Tensor) -> set[bytes]:
    return {x.numpy().tobytes() for x in images}


def _digits(**kwargs) -> DigitsDataModule:
    d = DigitsDataModule(train_fraction=0.55, val_fraction=0.2, **kwargs)
    d.setup()
    return d


def _check_k_shot(make, train, split_of, k: int, classes: int) -> None:
    """k per class, drawn from the training split, same seed same subset, another seed another one, val and
    test untouched."""
    full, c = make(), make(shots=k, shot_seed=1)
    a, b = make(shots=k, shot_seed=0), make(shots=k, shot_seed=0)
    assert torch.equal(torch.bincount(split_of(a, "train").labels), torch.full((classes,), k))
    assert _keys(train(a)) <= _keys(train(full)), "drawn from the training split"
    assert torch.equal(train(a), train(b)), "same seed, same subset"
    assert _keys(train(a)) != _keys(train(c)), "another seed, another subset"
    for split in ("val", "test"):
        for module in (a, c):
            assert torch.equal(_inputs(split_of(module, split)), _inputs(split_of(full, split)))


def _inputs(dataset) -> torch.Tensor:
    return dataset.images if hasattr(dataset, "images") else dataset.points


def test_digits_k_shot_is_k_per_class_seeded_and_leaves_val_and_test_alone():
    split_of = lambda d, split: d.splits[split]
    _check_k_shot(_digits, lambda d: d.splits["train"].images, split_of, 5, 10)
    assert torch.equal(torch.bincount(_digits(shots=20, shot_seed=2).splits["train"].labels), torch.full((10,), 20))


def test_digits_k_shot_refuses_more_shots_than_a_class_has():
    with pytest.raises(ValueError, match="class 6 has only 18 training examples, fewer than shots=20"):
        DigitsDataModule(shots=20).setup()  # the quickstart's 50% training share: 18 images of digit 6
    with pytest.raises(ValueError, match="positive"):
        DigitsDataModule(shots=0)


def _shapes(**kwargs) -> ShapesDataModule:
    d = ShapesDataModule(train_per_class=6, val_per_class=1, test_per_class=1, num_points=16, **kwargs)
    d.setup()
    return d


def test_shapes_k_shot_is_k_per_class_seeded_and_leaves_val_and_test_alone():
    split_of = lambda d, split: d.datasets[split]
    _check_k_shot(_shapes, lambda d: d.datasets["train"].points, split_of, 3, 9)
    with pytest.raises(ValueError, match=r"shots must be in \[1, train_per_class=6\]"):
        ShapesDataModule(train_per_class=6, shots=7)


# -- the table machinery, with run_one faked ----------------------------------------------------------------
ACC = {0: 0.50, 1: 0.60, 2: 0.70}  # test accuracy by seed


@pytest.fixture
def fake_runs(monkeypatch):
    calls = []

    def run_one(method, pretrained, lr, epochs, runs_dir, name, pretrain_epochs=None, seed=0, config=q.CONFIG,
                shots=None, precision="32", extra=()):  # fmt: skip
        calls.append({"method": method, "pretrained": pretrained, "lr": lr, "epochs": epochs, "seed": seed,
                      "shots": shots, "precision": precision, "extra": list(extra), "config": config})  # fmt: skip
        bonus = 0.1 if shots == 20 else 0.0
        return {"val_acc": ACC[seed] + bonus, "test_acc": ACC[seed] + bonus, "trainable": 1000 + len(str(method))}

    monkeypatch.setattr(q, "run_one", run_one)
    return calls


@pytest.fixture
def fake_cells(monkeypatch):
    """The sweep runner's cells, faked: a k-shot cell's accuracy is ACC[seed] (+0.1 at k = 20)."""
    cells = []

    def run_one(self, cell, device):
        cells.append(cell)
        acc = ACC[cell.seed] + (0.1 if cell.args["data.init_args.shots"] == 20 else 0.0)
        method = cell.args.get("model.init_args.method")
        summary = {"metrics": {"val/acc": acc, "test/acc": acc}, "trainable": 1000 + len(str(method)), "seconds": 1.0}
        self.result_path(cell).write_text(json.dumps(summary))  # as the real runner: a finished cell is kept
        return _result(cell, summary)

    monkeypatch.setattr(Runner, "run_one", run_one)
    return cells


def _main(tmp_path, *extra: str) -> list[str]:
    argv = ["--shots", "5,20", "--seeds", "0,1,2", "--methods", "linear,lora,vpt", "--epochs", "7",
            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out"), *extra]  # fmt: skip
    q.main(argv)
    return argv


def test_kshot_table_aggregates_writes_and_names_the_command(tmp_path, fake_cells, capsys):
    argv = _main(tmp_path)
    assert len(fake_cells) == 3 * 2 * 3, "every method x k x seed"
    assert {c.args["trainer.precision"] for c in fake_cells} == {"32"}
    assert {(c.args["trainer.max_epochs"], c.args["trainer.check_val_every_n_epoch"]) for c in fake_cells} == {(7, 7)}
    assert {(c.args["data.init_args.train_fraction"], c.args["data.init_args.val_fraction"]) for c in fake_cells} == {
        (0.55, 0.2)
    }, "the digits k-shot split"
    assert all(c.args["data.init_args.shot_seed"] == c.args["seed_everything"] == c.seed for c in fake_cells)
    lora = [c for c in fake_cells if c.method == "lora"]
    assert all("model.init_args.method" not in c.args for c in lora), "the quickstart config's own method"
    assert {c.args["model.init_args.lr"] for c in lora} == {q.RUNS["lora (quickstart)"][2]}, "the quickstart's lr"
    assert sorted((c.args["data.init_args.shots"], c.seed) for c in lora) == [(5, 0), (5, 1), (5, 2), (20, 0), (20, 1),
                                                                               (20, 2)]  # fmt: skip
    assert all(Path(f).is_absolute() for c in fake_cells for f in c.configs), "runs from any folder"

    rows = list(csv.DictReader((tmp_path / "out" / "digits-kshot.csv").open()))
    assert list(rows[0])[:8] == ["method", "shots", "seeds", "acc_mean", "acc_std", "trainable", "epochs", "precision"]
    assert [(r["method"], r["shots"]) for r in rows] == [(m, k) for m in ("linear", "lora", "vpt") for k in ("5", "20")]
    k5 = next(r for r in rows if r["method"] == "linear" and r["shots"] == "5")
    assert float(k5["acc_mean"]) == pytest.approx(60.0)
    assert float(k5["acc_std"]) == pytest.approx(statistics.stdev([50.0, 60.0, 70.0]), abs=0.01)
    assert k5["seeds"] == "0;1;2" and k5["epochs"] == "7" and k5["precision"] == "32"
    assert float(next(r for r in rows if r["method"] == "linear" and r["shots"] == "20")["acc_mean"]) == 70.0

    md = (tmp_path / "out" / "digits-kshot.md").read_text()
    header = md.split("\n| method")[0]
    assert "python -m mmpeft.quickstart " + " ".join(argv) in header
    assert "precision 32" in header and f"torch {torch.__version__}" in header and "mmpeft " in header
    assert "| method | trainable | k=5 acc mean ± std | k=20 acc mean ± std |" in md
    assert "| 60.00 ± 10.00 | 70.00 ± 10.00 |" in md
    assert "digits-kshot.md" in capsys.readouterr().out


def test_kshot_table_refuses_to_overwrite(tmp_path, fake_cells, capsys):
    _main(tmp_path)
    before = (tmp_path / "out" / "digits-kshot.csv").read_text()
    n = len(fake_cells)
    with pytest.raises(SystemExit):
        _main(tmp_path)
    assert "--overwrite" in capsys.readouterr().err and len(fake_cells) == n, "refused before training anything"
    assert (tmp_path / "out" / "digits-kshot.csv").read_text() == before
    _main(tmp_path, "--overwrite")
    assert len(fake_cells) == n, "the cells' results are kept: an overwrite rewrites the table, reruns nothing"


def test_kshot_precision_reaches_the_trainer_and_the_file_name(tmp_path, fake_cells):
    _main(tmp_path, "--precision", "bf16-mixed", "--task", "shapes")
    assert {c.args["trainer.precision"] for c in fake_cells} == {"bf16-mixed"}
    assert {tuple(c.configs) for c in fake_cells} == {(str(q.QUICKSTARTS["shapes"][0]),)}
    assert (tmp_path / "out" / "shapes-kshot-bf16-mixed.md").exists()
    assert "precision bf16-mixed" in (tmp_path / "out" / "shapes-kshot-bf16-mixed.md").read_text()
    assert not (tmp_path / "out" / "shapes-kshot.md").exists()


def test_kshot_rejects_unknown_methods(tmp_path, fake_cells, capsys):
    with pytest.raises(ValueError, match="unknown k-shot method"):
        q.kshot_table("digits", [5], [0], ["lora", "nope"], runs_dir=str(tmp_path))
    with pytest.raises(SystemExit):
        q.main(["--shots", "5", "--methods", "lora,nope", "--out-dir", str(tmp_path)])
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert not fake_cells


def test_every_kshot_method_is_registered_and_covers_both_tasks():
    from mmpeft.core.method import list_methods

    for task in q.QUICKSTARTS:
        runs = q.kshot_runs(task)
        assert list(runs) == q.ORDER
        names = {m if isinstance(m, str) else m["name"] for m, _, _ in runs.values() if m is not None}
        assert names <= set(list_methods())
        assert runs["random_probe"][1] is False and runs["scratch"][1] is False and runs["linear"][1] is True


def test_the_shapes_table_is_a_mean_over_three_seeds_and_digits_keeps_one(tmp_path, fake_runs, capsys):
    q.main(["--task", "shapes", "--runs-dir", str(tmp_path)])
    assert len(fake_runs) == 3 * len(q.SHAPES_RUNS) and {c["seed"] for c in fake_runs} == {0, 1, 2}
    out = capsys.readouterr().out
    assert "seeds 0, 1, 2; test acc: mean ± std (sample std), then per seed" in out
    assert "| linear probe | 0.600 ± 0.100 (0.500, 0.600, 0.700) | 0.600 |" in out
    results = q.transfer_table(3, str(tmp_path), ["bitfit"], task="shapes", seeds=[1, 2])
    assert results["bitfit"]["test_accs"] == [0.6, 0.7] and results["bitfit"]["test_acc"] == pytest.approx(0.65)
    fake_runs.clear()
    q.main(["--runs-dir", str(tmp_path)])
    assert {c["seed"] for c in fake_runs} == {0} and "| linear probe | 0.500 | 0.500 |" in capsys.readouterr().out


@pytest.mark.parametrize("task", sorted(q.QUICKSTARTS))
def test_kshot_sweep_files_plan_the_table_and_agree_with_the_quickstart_runs(task):
    """The shipped k-shot sweep is the table's one source: 11 methods x k in {5, 20} x seeds 0-2, each seed drawing
    its own shots; a method the full-data quickstart table has too keeps that table's method, backbone and lr."""
    sweep = q.load_sweep(q.KSHOT_SWEEPS[task])
    check_sweep(sweep, q.KSHOT_SWEEPS[task])  # `mmpeft sweep`'s pre-flight: every cell parses with fit's parser
    cells = plan_stage2(sweep, [])
    assert len(cells) == 11 * 2 * 3 and sweep.tasks == ["k5", "k20"] and sweep.seeds == [0, 1, 2]
    assert all(c.args["data.init_args.shot_seed"] == c.seed for c in cells)
    assert {(c.task, c.args["data.init_args.shots"]) for c in cells} == {("k5", 5), ("k20", 20)}
    assert all("data.init_args.protocol" not in c.args and "data.init_args.task" not in c.args for c in cells)
    assert {c.args["trainer.max_epochs"] for c in cells} == {50}
    quickstart = q.QUICKSTARTS[task][1]
    shared = {"random_probe": "linear probe, random weights", "linear": "linear probe", "bitfit": "bitfit",
              "lora": "lora (quickstart)", "adapter": "adapter", "full": "full fine-tuning",
              "scratch": "from scratch"}  # fmt: skip
    runs = q.kshot_runs(task)
    for key, label in shared.items():
        assert runs[key] == quickstart[label], key
