"""`mmpeft bench` end to end on a tiny backbone, and packaging rules."""

from __future__ import annotations

import csv
import pathlib
import re

from mmpeft.cli import main


def test_bench_writes_rows_with_floor_ratios(tmp_path, capsys):
    args = ["bench", "--backbone", "digits_vit", "--img-size", "8", "--in-chans", "1", "--batch", "4", "--methods",
            "lora,full", "--steps", "2", "--warmup", "1", "--num-classes", "10", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (table,) = tmp_path.glob("*.csv")
    rows = {r["method"]: r for r in csv.DictReader(table.open())}
    assert list(rows) == ["floor", "lora", "full"]
    assert rows["floor"]["time_vs_floor"] == "1.0" and int(rows["floor"]["trainable"]) == 128
    assert int(rows["full"]["trainable"]) == 796_288 + 1_290
    for r in rows.values():
        assert float(r["step_ms"]) > 0 and r["mem_vs_floor"]
    assert (tmp_path / table.name.replace(".csv", ".md")).read_text().startswith("# mmpeft bench")


def test_only_the_pytorch_lightning_namespace_is_used():
    """Mixing `lightning.pytorch` with `pytorch_lightning` breaks callbacks (ecosystem spec §3.1)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "mmpeft"
    offenders = [
        str(p) for p in root.rglob("*.py") if re.search(r"^\s*(import lightning|from lightning\b)", p.read_text(), re.M)
    ]
    assert not offenders


def test_checkpoints_are_loaded_safely():
    root = pathlib.Path(__file__).resolve().parents[1] / "mmpeft"
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_bench_on_a_denoiser_uses_its_batch_and_loss_and_a_floor_after_the_first_layer(tmp_path):
    args = ["bench", "--backbone", "tiny_dit", "--batch", "2", "--methods", "lora", "--steps", "1",
            "--warmup", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (table,) = tmp_path.glob("*.csv")
    assert table.name.startswith("tiny_dit-16px-b2-")
    rows = {r["method"]: r for r in csv.DictReader(table.open())}
    assert int(rows["floor"]["trainable"]) == 16  # one vector on the patch projection's 16 output channels
    assert int(rows["lora"]["trainable"]) == 2 * 8 * 4 * (16 + 16)  # 2 blocks x r=8 on to_q, to_k, to_v, to_out.0
    assert float(rows["lora"]["step_ms"]) > 0 and rows["lora"]["time_vs_floor"]
