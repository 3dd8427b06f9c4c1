"""Exports beyond LoRA (issue 24 item 7): the merged denoiser (and text encoder) as plain diffusers / transformers
folders for any mergeable method, SVFit as a diffusers LoRA file (its update is exactly rank r), and
`mmpeft export` end to end. Every export is reloaded without mmpeft and must give the trained model's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpeft.backbones import DiffusersDiT, DiffusersUNet
from mmpeft.backbones.tiny_diffusers import tiny_sd_folder, tiny_sd_pipeline
from mmpeft.cli import main
from mmpeft.core.errors import OutputExists
from mmpeft.core.model import PeftModel
from mmpeft.core.state import save_adapter
from mmpeft.interop.diffusers_lora import export_diffusers_lora
from mmpeft.interop.merged_export import export_merged
from mmpeft.tasks import LatentDiffusion
from tests.test_diffusers_interop import _ours, _theirs  # the same inputs, UNet through mmpeft and plain

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Move every trainable tensor off its initial value (an untrained method is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("method", ["difffit", "svfit", "lora", "bitfit"])
def test_the_merged_unet_reloads_in_plain_diffusers_with_the_trained_outputs(method, tmp_path):
    from diffusers import UNet2DConditionModel

    model = PeftModel(DiffusersUNet(source=str(tiny_sd_folder())), method)
    _perturb(model)
    expected = _ours(model)
    with torch.no_grad(), model.disabled():
        assert (expected - _ours(model)).abs().max() > 1e-3, "the method must change the output"
    written = export_merged(model, tmp_path / "merged")
    assert written == {"unet": tmp_path / "merged" / "unet"}
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet")
    assert (_theirs(reloaded) - expected).abs().max() < TOL


def test_difffit_s_merged_dit_reloads_in_plain_diffusers(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = PeftModel(DiffusersDiT(source="tiny_dit"), {"name": "difffit", "preset": "paper"})
    _perturb(model)
    x, target = model.backbone.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
    export_merged(model, tmp_path / "merged")
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").eval()
    with torch.no_grad():
        theirs = plain(x.x, timestep=x.timestep, class_labels=x.cond).sample
    assert (theirs - expected).abs().max() < TOL


def test_a_text_method_is_merged_into_its_own_folder(tmp_path):
    from transformers import CLIPTextModel

    text_lora = {"name": "lora", "r": 2, "targets": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    task = LatentDiffusion(DiffusersUNet(source="tiny_sd"), method="difffit", text_method=text_lora)
    _perturb(task.model)
    ids = torch.arange(2 * 77).view(2, 77) % 1000
    with torch.no_grad():
        expected = task.text_encoder.eval()(ids)[0]
    assert set(export_merged(task.model, tmp_path / "m")) == {"unet", "text_encoder"}
    with torch.no_grad():
        theirs = CLIPTextModel.from_pretrained(tmp_path / "m" / "text_encoder").eval()(ids)[0]
    assert (theirs - expected).abs().max() < TOL


def test_svfit_is_written_as_its_exact_rank_r_lora_and_loads_in_the_pipeline(tmp_path):
    model = PeftModel(DiffusersUNet(source=str(tiny_sd_folder())), {"name": "svfit", "r": 3})
    _perturb(model, std=0.2)
    expected = _ours(model)
    file = export_diffusers_lora(model, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(file)
    a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
    assert a_keys and all(tensors[k].shape[0] == 3 for k in a_keys), "rank r = 3 in every layer"
    pipe = tiny_sd_pipeline(folder=True)
    pipe.load_lora_weights(str(tmp_path))
    assert (_theirs(pipe.unet) - expected).abs().max() < TOL


def test_export_refuses_a_non_empty_folder_and_methods_without_the_format(tmp_path):
    model = PeftModel(DiffusersUNet(source=str(tiny_sd_folder())), "difffit")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists, match="not empty"):
        export_merged(model, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    from mmpeft.core.errors import NotSupported

    with pytest.raises(NotSupported, match="no low-rank form"):
        export_diffusers_lora(model, tmp_path / "lora")


def test_export_command_writes_both_formats_from_a_run_s_config_and_adapter(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    config = str(REPO / "configs/diffusion/svfit.yaml")
    from mmpeft.lab.run_configs import task_from_configs

    task = task_from_configs([config]).eval()
    _perturb(task.model, std=0.2)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(task.model, adapter)
    expected = _ours(task.model)
    base = ["export", "-c", config, "--adapter", str(adapter)]
    assert main([*base, "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    assert main([*base, "--format", "diffusers", "--out", str(tmp_path / "merged")]) == 0
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet")
    assert (_theirs(merged) - expected).abs().max() < TOL
    assert main([*base, "--format", "diffusers", "--out", str(tmp_path / "merged")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", "-c", config, "--format", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "needs the trained adapter" in capsys.readouterr().err


def test_a_merged_folder_samples_the_same_images_as_the_adapter(tmp_path):
    """`mmpeft sample --source <merged unet/>` (no adapter) draws what `--adapter` draws on the original weights."""
    import numpy as np
    from PIL import Image

    from mmpeft.lab.run_configs import task_from_configs

    config = str(REPO / "configs/diffusion/difffit.yaml")
    task = task_from_configs([config]).eval()
    _perturb(task.model, std=0.05)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(task.model, adapter)
    export_merged(task.model, tmp_path / "merged")
    common = ["--prompt", "a photo of sks dog", "--seeds", "0", "--steps", "2"]
    assert main(["sample", "-c", config, "--adapter", str(adapter), "--out", str(tmp_path / "a"), *common]) == 0
    merged = ["sample", "-c", config, "--source", str(tmp_path / "merged" / "unet"), "--out", str(tmp_path / "b")]
    assert main([*merged, *common]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "000-seed0.png"), dtype=np.int16) for d in ("a", "b"))
    assert np.abs(a - b).max() <= 2, "the same image up to rounding of the merged weights"
