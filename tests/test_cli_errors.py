"""Errors that were unclear or late (issue 22 item 21): an mmpeft file given to import-lora, interrupted sweeps,
a full disk, two runs of one name started at once, pretraining ended by SIGTERM."""

from __future__ import annotations

from mmpeft.cli import main


def test_import_lora_names_an_mmpeft_adapter_file(tmp_path, capsys):
    from mmpeft.backbones import DiffusersUNet
    from mmpeft.core.model import PeftModel
    from mmpeft.core.state import save_adapter
    from mmpeft.interop import tiny_sd_folder
    from mmpeft.methods.lora import LoRA

    adapter = tmp_path / "adapter.safetensors"
    save_adapter(PeftModel(DiffusersUNet(source=str(tiny_sd_folder())), LoRA(r=4)), adapter)
    out = tmp_path / "imported.safetensors"
    capsys.readouterr()  # what building the tiny pipeline printed
    assert main(["import-lora", str(adapter), "--unet", "tiny_sd", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{str(adapter)!r} is already an mmpeft adapter file (header format 'mmpeft-adapter/" in err, err
    assert "not a diffusers LoRA file" in err and f"mmpeft export-lora {adapter}" in err
    assert "lora_A" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
