"""The digits-diffusion quickstart (issue 24 item 8) on a reduced budget: fine-tuning the upright-digits DiT to
the rotated digits beats the frozen model. Measured at this budget (pretraining 40 epochs, fine-tuning 40): FID in
the rotated-digit classifier's features 1700 (frozen) against 500 / 350 / 270 (DiffFit / LoRA / full), conditional
accuracy 0.11 against 0.13 / 0.29 / 0.24. DiffFit's accuracy gain is within seed noise at this budget (0.35 after
120 epochs), so its accuracy is not asserted here; the issue stays open on it."""

from __future__ import annotations

import pytest

from mmpeft.lab.diffusion_transfer import DIFFUSION_RUNS, diffusion_transfer, write_grid


@pytest.fixture(scope="module")
def transfer():
    return diffusion_transfer(epochs=40, per_class=10, steps=25, pretrain_epochs=40, log=lambda line: None)


def test_fine_tuning_beats_the_frozen_model(transfer):
    results, _ = transfer
    frozen = results["frozen"]
    assert frozen["trainable"] == 0 and list(results) == list(DIFFUSION_RUNS)
    for label in ("difffit", "lora", "full"):
        assert results[label]["fid"] < frozen["fid"] / 2, (
            f"{label}: FID {results[label]['fid']:.1f} vs {frozen['fid']:.1f}"
        )
    for label in ("lora", "full"):
        acc = results[label]["cond_acc"]
        assert acc > frozen["cond_acc"] + 0.08, f"{label}: conditional accuracy {acc:.3f} vs {frozen['cond_acc']:.3f}"
    assert results["difffit"]["trainable"] < results["lora"]["trainable"] < results["full"]["trainable"]


def test_the_grid_has_a_row_per_run_and_a_column_per_digit(transfer, tmp_path):
    from PIL import Image

    _, samples = transfer
    grid = write_grid(samples, 10, tmp_path / "grid.png")
    assert Image.open(grid).size == (10 * 8 * 4, len(samples) * 8 * 4)
