"""The diffusion quickstarts (issue 24 item 8) on a reduced budget (the DiT pretrained 40 epochs, shared).

Transfer: fine-tuning the upright-digits DiT to the rotated digits beats the frozen model. Measured at this budget
(fine-tuning 40 epochs): FID in the rotated-digit classifier's features 1700 (frozen) against 500 / 350 / 270
(DiffFit / LoRA / full), conditional accuracy 0.11 against 0.13 / 0.29 / 0.24. DiffFit's accuracy is not asserted:
its gain is +0.00 to +0.03 over seeds 0-2 at this budget (+0.04 to +0.10 after 120 epochs), above the frozen model's
in every seed of the full quickstart (0.213 ± 0.010 against 0.137 ± 0.018) but not by a margin above noise at a test's
budget. Its trainable set acts per channel, the same at every position, and a rotation is a permutation of positions.

Personalization (`configs/diffusion/digits_personalize.yaml`, 30 epochs here): prior preservation keeps the digits.
Measured over seeds 0-2: the upright classifier's accuracy on digits 0-9 is 0.45-0.54 with the prior, 0.16-0.20
without it (frozen 0.51-0.55; at 60 epochs 0.47-0.52 against 0.14-0.17). The new style is learned at the
quickstart's 90 epochs on the 100-epoch DiT (the committed table), not yet at this budget, so it is not asserted
here."""

from __future__ import annotations

import pytest

from mmpeft.lab.diffusion_personalize import NEW_CLASS, PERSONALIZE_RUNS, diffusion_personalize
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


@pytest.fixture(scope="module")
def personalization(tmp_path_factory):
    work = tmp_path_factory.mktemp("personalize")
    return diffusion_personalize(work, epochs=30, per_class=20, pretrain_epochs=40, log=lambda line: None), work


def test_prior_preservation_keeps_the_digits_the_new_class_would_overwrite(personalization):
    (results, samples), work = personalization
    assert list(results) == list(PERSONALIZE_RUNS)
    frozen, prior, free = results["frozen"], results["lora, prior preservation"], results["lora, no prior"]
    assert prior["kept"] > free["kept"] + 0.2, f"prior {prior['kept']:.3f} vs none {free['kept']:.3f}"
    assert prior["kept"] > frozen["kept"] - 0.15, f"prior {prior['kept']:.3f} vs frozen {frozen['kept']:.3f}"
    assert frozen["trainable"] == 0 and prior["trainable"] == free["trainable"] > 0
    assert all(images.shape == ((NEW_CLASS + 1) * 20, 1, 8, 8) for images in samples.values())
    # the five instance images and the class images of the ten digits, ten each, made once
    assert len(list((work / "instance").glob("*.png"))) == 5
    assert sorted(len(list(d.glob("*.png"))) for d in (work / "class_images").iterdir() if d.is_dir()) == [10] * 10
