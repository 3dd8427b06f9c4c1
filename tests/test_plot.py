"""`mmpeft plot` (bench and accuracy PNGs from result CSVs) and `log_table_to_wandb` (grouped W&B runs)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

from mmpeft.cli import main
from mmpeft.core.errors import OutputExists
from mmpeft.lab.plot import (
    PlotInputError,
    SkippedRow,
    accuracy_figure,
    accuracy_points,
    bench_figure,
    detect_kind,
    log_table_to_wandb,
    plot_tables,
    read_table,
)

BENCH_COLUMNS = [
    "method", "trainable", "step_ms", "step_ms_min", "step_ms_max", "time_vs_floor", "peak_mem_mb",
    "peak_mem_min", "peak_mem_max", "mem_vs_floor", "infer_ms", "infer_merged_ms", "precision", "error",
]  # fmt: skip
BENCH_ROWS = [
    ["floor", 768, 100, 95, 110, 1.0, 500, 498, 505, 1.0, 40, "", "32", ""],
    ["lora", 300000, 120, 110, 150, 1.2, 600, 590, 640, 1.2, 48, 40, "32", ""],
    ["ssf", 200000, 130, 125, 131, 1.3, 650, 650, 650, 1.3, 50, 40, "32", ""],
    ["vpt", 8000, "", "", "", "", "", "", "", "", "", "", "32", "failed: out of memory"],
    ["adapter", 150000, 140, 130, 160, 1.4, 700, 690, 720, 1.4, 55, "", "32", ""],
]
TRANSFER_COLUMNS = ["method", "shots", "acc_mean", "acc_std", "trainable"]
TRANSFER_ROWS = [
    ["zeroshot", 0, 63.2, 0.0, 0],  # 0 trainable: a reference line, not a marker
    ["coop", 1, 65.0, 1.2, 2048],
    ["coop", 16, 72.1, 0.5, 2048],
    ["lora", 1, 66.0, 1.5, 180000],
    ["lora", 16, 75.3, 0.4, 180000],
    ["linear", 16, 70.0, 0.3, 51300],
]


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def errorbar_points(ax) -> int:
    return sum(len(c.lines[0].get_xdata()) for c in ax.containers if isinstance(c, ErrorbarContainer))


def test_bench_figure_bars_error_bars_and_floor(tmp_path):
    columns, rows = read_table(write_csv(tmp_path / "b.csv", BENCH_COLUMNS, BENCH_ROWS))
    assert detect_kind(columns) == "bench"
    fig = bench_figure(rows)
    step, memory, infer = fig.axes  # infer_ms present: a third panel
    assert len(step.patches) == len(memory.patches) == 3  # floor is a line, the failed vpt row is left out
    assert [t.get_text() for t in step.get_xticklabels()] == ["lora", "ssf", "adapter"]
    assert [line.get_ydata()[0] for line in step.lines if line.get_linestyle() == "--"] == [100.0]
    bars = [c for c in step.containers if isinstance(c, ErrorbarContainer)][0]
    assert len(bars.lines[2][0].get_segments()) == 3  # min..max on every method
    assert len(infer.patches) == 3 + 2  # as trained for 3 methods, merged for the 2 that have it


def test_old_bench_table_plots_without_the_new_columns(tmp_path):
    old = ["method", "trainable", "step_ms", "time_vs_floor", "peak_mem_mb", "mem_vs_floor", "device", "error"]
    rows = [["floor", 768, 100, 1.0, 500, 1.0, "cpu", ""], ["lora", 300, 120, 1.2, 600, 1.2, "cpu", ""]]
    _, table = read_table(write_csv(tmp_path / "old.csv", old, rows))
    fig = bench_figure(table)
    assert len(fig.axes) == 2
    assert not any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)


def test_accuracy_points_series_per_shots_and_zero_shot_line(tmp_path):
    columns, rows = read_table(write_csv(tmp_path / "t.csv", TRANSFER_COLUMNS, TRANSFER_ROWS))
    assert detect_kind(columns) == "accuracy"
    points, ylabel = accuracy_points(rows, columns=columns)
    assert ylabel == "acc_mean" and len(points) == 6
    assert {p["series"] for p in points} == {"0", "1", "16"}
    lora16 = next(p for p in points if p["label"] == "lora" and p["series"] == "16")
    assert (lora16["acc"], lora16["std"], lora16["trainable"]) == (75.3, 0.4, 180000)
    ax = accuracy_figure(points, ylabel).axes[0]
    assert ax.get_xscale() == "log"
    assert errorbar_points(ax) == 5  # the zero-shot row is a horizontal line
    assert len([t for t in ax.texts]) == 5  # each marker labelled with its method


def test_sweep_cells_use_stage_2_in_percent_with_seed_std(tmp_path):
    columns = ["id", "stage", "task", "method", "seed", "point", "val/acc", "test/acc", "trainable", "adapter"]
    rows = [
        ["a", 1, "cifar", "lora", 0, "{}", 0.5, 0.10, 1000, ""],  # a tuning run: left out
        ["b", 2, "cifar", "lora", 0, "{}", 0.6, 0.60, 1000, ""],
        ["c", 2, "cifar", "lora", 1, "{}", 0.6, 0.62, 1000, ""],
        ["d", 2, "cifar", "ssf", 0, "{}", 0.6, 0.55, 800, ""],
    ]
    path = write_csv(tmp_path / "cells.csv", columns, rows)
    names, table = read_table(path)
    points, ylabel = accuracy_points(table, columns=names)
    assert ylabel == "test/acc (%)"
    lora = next(p for p in points if p["label"] == "lora")
    assert lora["acc"] == pytest.approx(61.0) and lora["std"] == pytest.approx(1.4142, abs=1e-3)
    assert next(p for p in points if p["label"] == "ssf")["std"] is None  # one seed, no std column
    rows += [["e", 2, "dtd", "lora", 0, "{}", 0.5, 0.40, 1000, ""], ["f", 2, "dtd", "ssf", 0, "{}", 0.5, 0.45, 800, ""]]
    points, ylabel = accuracy_points(read_table(write_csv(tmp_path / "two.csv", columns, rows))[1], columns=columns)
    assert ylabel == "test/acc (%), mean of 2 tasks"
    assert {p["label"]: (round(p["acc"], 2), p["std"]) for p in points} == {"lora": (50.5, None), "ssf": (50.0, None)}
    (png,) = plot_tables([path], tmp_path / "plots")
    assert png.name == f"{tmp_path.name}-cells.png"  # a sweep's cells.csv is named after its folder
    assert_png(png)


def test_plot_tables_writes_refuses_to_overwrite_and_replaces_when_asked(tmp_path):
    bench = write_csv(tmp_path / "vit-224px-b8-cpu-32.csv", BENCH_COLUMNS, BENCH_ROWS)
    transfer = write_csv(tmp_path / "clip-fewshot.csv", TRANSFER_COLUMNS, TRANSFER_ROWS)
    out = tmp_path / "plots"
    written = plot_tables([bench, transfer], out)
    assert [p.name for p in written] == ["vit-224px-b8-cpu-32.png", "clip-fewshot.png"]
    for png in written:
        assert_png(png)
    before = written[0].read_bytes()
    with pytest.raises(OutputExists, match="--overwrite"):
        plot_tables([bench], out)
    assert written[0].read_bytes() == before
    assert plot_tables([bench], out, overwrite=True) == written[:1]


def test_bad_csv_names_the_expected_columns(tmp_path):
    bad = write_csv(tmp_path / "bad.csv", ["name", "score"], [["x", 1]])
    with pytest.raises(PlotInputError, match=r"step_ms.*trainable.*acc_mean"):
        plot_tables([bad], tmp_path / "plots")
    with pytest.raises(PlotInputError, match="lacks method"):
        plot_tables([bad], tmp_path / "plots", kind="bench")
    bench = write_csv(tmp_path / "b.csv", BENCH_COLUMNS, BENCH_ROWS)
    with pytest.raises(PlotInputError, match="not an accuracy table, it lacks an accuracy column"):
        plot_tables([bench], tmp_path / "plots", kind="accuracy")
    assert not (tmp_path / "plots").exists()  # nothing written when any input is bad


def test_cli_end_to_end(tmp_path, capsys):
    bench = write_csv(tmp_path / "vit.csv", BENCH_COLUMNS, BENCH_ROWS)
    transfer = write_csv(tmp_path / "fewshot.csv", TRANSFER_COLUMNS, TRANSFER_ROWS)
    out = tmp_path / "plots"
    assert main(["plot", str(bench), str(transfer), "--out", str(out)]) == 0
    assert_png(out / "vit.png")
    assert_png(out / "fewshot.png")
    assert "wrote" in capsys.readouterr().err
    assert main(["plot", str(bench), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["plot", str(bench), "--out", str(out), "--overwrite"]) == 0
    bad = write_csv(tmp_path / "bad.csv", ["name"], [["x"]])
    assert main(["plot", str(bad), "--out", str(out)]) == 2
    assert "accuracy table needs" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert main(["plot", str(transfer), "--metric", "nope", "--out", str(tmp_path / "o2")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def wandb_env(monkeypatch, tmp_path: Path, mode: str) -> Path:
    monkeypatch.setenv("WANDB_MODE", mode)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_log_table_to_wandb_offline_one_run_per_row_in_the_group(monkeypatch, tmp_path):
    root = wandb_env(monkeypatch, tmp_path, "offline")
    rows = [{"method": "floor", "step_ms": "100.5", "error": ""}, {"method": "lora", "step_ms": 120.0}]
    ids = log_table_to_wandb(rows, group="vit-224px-b8-cpu-32", job_type="bench", config={"backbone": "vit"})
    assert len(ids) == 2
    files = sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.stem.removeprefix("run-") for f in files} == set(ids)
    expected = (b"vit-224px-b8-cpu-32", b"bench", b"step_ms")
    deadline = time.monotonic() + 60  # W&B's service writes the run file itself: on a loaded machine, a moment late
    while time.monotonic() < deadline and not all(all(e in f.read_bytes() for e in expected) for f in files):
        time.sleep(0.5)
    for f in files:
        data = f.read_bytes()
        assert all(e in data for e in expected), (f, len(data))


def test_log_table_to_wandb_disabled_writes_nothing(monkeypatch, tmp_path):
    root = wandb_env(monkeypatch, tmp_path, "disabled")
    rows = [{"method": "lora", "step_ms": 1.0}]
    assert log_table_to_wandb(rows, group="g", job_type="bench", config={}) == []  # the environment says so
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert log_table_to_wandb(rows, group="g", job_type="bench", config={}, mode="disabled") == []  # the caller
    assert not list(root.rglob("*.wandb"))


def test_unreadable_rows_are_named_with_their_line_and_reason(tmp_path):
    """Rows that cannot be read are left out with a warning naming file:line and why, never silently."""
    path = tmp_path / "fewshot.csv"
    lines = ["method,shots,acc_mean,acc_std,trainable", "coop,16,72.1,0.5,2048", "lora,16,75.3,0.4",  # line 3: 4 fields
             "ssf,16,n/a,0.2,1000", "linear,16,70.0,0.3,51300", "vpt,16,71,0.1,9000,extra"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(SkippedRow) as caught:
        columns, rows = read_table(path)
        points, _ = accuracy_points(rows, columns=columns)
    messages = [str(w.message) for w in caught]
    assert messages == [
        f"{path}:3: 4 fields, the header has 5; row left out of the plot",
        f"{path}:6: 6 fields, the header has 5; row left out of the plot",
        f"{path}:4: not a number: acc_mean='n/a'; row left out of the plot",
    ]
    assert sorted(p["label"] for p in points) == ["coop", "linear"]


def test_bench_rows_without_numbers_are_named(tmp_path):
    rows = [*BENCH_ROWS, ["dora", 1000, "oom?", "", "", "", "", "", "", "", "", "", "32", ""],
            ["ia3", 900, 125, "", "", "", "lots", "", "", "", "", "", "32", ""]]  # fmt: skip
    path = write_csv(tmp_path / "b.csv", BENCH_COLUMNS, rows)
    with pytest.warns(SkippedRow) as caught:
        fig = bench_figure(read_table(path)[1])
    assert [str(w.message) for w in caught] == [
        f"{path}:7: no number in step_ms / peak_mem_mb / infer_ms / infer_merged_ms (step_ms='oom?'); row left out "
        "of the plot",
        f"{path}:8: not a number: peak_mem_mb='lots'; left out of that panel",
    ]
    step_axis = fig.axes[0]
    assert "ia3" in [t.get_text() for t in step_axis.get_xticklabels()]


def test_cli_plots_a_folder_and_prints_the_skipped_rows(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    write_csv(results / "vit.csv", BENCH_COLUMNS, BENCH_ROWS)
    write_csv(results / "fewshot.csv", TRANSFER_COLUMNS, [*TRANSFER_ROWS, ["broken", 16, "", 0.1, 10]])
    (results / "notes.txt").write_text("not a table")
    out = tmp_path / "plots"
    assert main(["plot", str(results), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fewshot.png", "vit.png"]
    err = capsys.readouterr().err
    assert f"mmpeft: warning: {results / 'fewshot.csv'}:8: not a number: acc_mean=''; row left out of the plot" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty), "--out", str(out)]) == 2
    assert f"{empty}: a folder without CSV files" in capsys.readouterr().err
