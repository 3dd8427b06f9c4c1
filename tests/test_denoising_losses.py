"""The training-loss options of diffusers' example scripts on `Denoising` (issue 24 item 4): Min-SNR-γ weighting
(ε and v), noise offset and input perturbation, each off by default and applied to the training loss only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpeft.tasks.denoising import Denoising
from tests.conftest import tiny_dit


def _task(**options) -> Denoising:
    return Denoising(tiny_dit(), method="bitfit", **options)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])


def _loss(task: Denoising, stage: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    task.on_validation_epoch_start()  # evaluation noise is seeded per batch of an epoch: each call is batch 0
    inputs, targets = task.prepare_batch(_batch(), stage)
    with torch.no_grad():
        output = task.model(inputs)
    return task.loss_and_metrics(output, targets, stage), targets | {"output": output}


def _snr(task: Denoising, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ / (1 − ᾱ), written out here (the task uses diffusers' `compute_snr`)."""
    alpha_bar = task.scheduler.alphas_cumprod[t].double()
    return alpha_bar / (1 - alpha_bar)


def _mse_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output[:, : target.shape[1]].double() - target.double()) ** 2).flatten(1).mean(1)


def test_every_option_is_off_by_default_and_the_loss_is_the_plain_mse():
    task = _task()
    assert (task.snr_gamma, task.noise_offset, task.input_perturbation) == (None, 0.0, 0.0)
    loss, seen = _loss(_task(vlb=False), "train")
    assert loss.item() == pytest.approx(F.mse_loss(seen["output"][:, :4], seen["target"]).item(), rel=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_sample_by_the_paper_s_rule(prediction):
    task = _task(snr_gamma=0.05, vlb=False, prediction_type=prediction)  # small: clips most drawn timesteps
    loss, seen = _loss(task, "train")
    snr = _snr(task, seen["timesteps"])
    weights = snr.clamp(max=0.05) / (snr if prediction == "epsilon" else snr + 1)
    expected = (_mse_per_sample(seen["output"], seen["target"]) * weights).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.allclose(weights, torch.ones_like(weights)), "the weights must differ from 1 to prove anything"
    weighted_val, _ = _loss(task, "val")
    task.snr_gamma = None
    plain, _ = _loss(task, "val")
    assert weighted_val.item() == plain.item(), "val/loss stays the plain MSE"


def test_noise_offset_shifts_each_sample_s_channels_by_a_constant_in_training_only():
    plain, offset = _task(), _task(noise_offset=0.1)
    _, a = _loss(plain, "train")
    _, b = _loss(offset, "train")
    shift = b["target"] - a["target"]  # ε-prediction: the target is the noise; the same seed drew the same base
    assert shift.abs().max() > 1e-3
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6), "one offset per sample and channel"
    _, va = _loss(plain, "val")
    _, vb = _loss(offset, "val")
    assert torch.equal(va["target"], vb["target"]) and torch.equal(va["noisy"], vb["noisy"])


def test_input_perturbation_noises_the_input_with_extra_noise_but_keeps_the_target():
    plain, perturbed = _task(), _task(input_perturbation=0.1)
    _, a = _loss(plain, "train")
    _, b = _loss(perturbed, "train")
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["timesteps"], b["timesteps"])
    clean_noisy = perturbed.scheduler.add_noise(b["latents"], b["target"], b["timesteps"])
    assert (b["noisy"] - clean_noisy).abs().max() > 1e-4, "the input carries the extra noise"
    _, vb = _loss(perturbed, "val")
    _, va = _loss(plain, "val")
    assert torch.equal(va["noisy"], vb["noisy"])


def test_bad_values_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        _task(snr_gamma=0.0)
    with pytest.raises(ValueError, match="noise_offset and input_perturbation"):
        _task(noise_offset=-0.1)


def test_every_diffusion_config_names_the_loss_options_and_keeps_them_off():
    """Issue 24 item 4: each option is named in every diffusion config, off (the comments give diffusers' values)."""
    from pathlib import Path

    import yaml

    configs = sorted((Path(__file__).resolve().parents[1] / "configs/diffusion").glob("*.yaml"))
    assert len(configs) == 18
    options = ("snr_gamma", "noise_offset", "input_perturbation")
    for path in configs:
        config = yaml.safe_load(path.read_text())["model"]
        model = config["init_args"]
        if config["class_path"].endswith("EfficientDMDistillation"):  # no images: its loss is the teacher's ε
            assert not set(options) & set(model), path.name
            continue
        assert (model["snr_gamma"], model["noise_offset"], model["input_perturbation"]) == (None, 0.0, 0.0), path.name
