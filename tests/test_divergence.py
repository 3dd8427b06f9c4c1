"""NaN never passes through: a diverged run stops with a non-zero exit naming the step and the last good
checkpoint and writes no adapter; non-finite data is found before training; adapter files holding NaN are
neither written nor loaded; result files stay valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpeft.backbones import TimmViT
from mmpeft.cli import finite_or_none, main
from mmpeft.core.model import PeftModel
from mmpeft.core.state import NonFiniteTensors, load_adapter, read_adapter, save_adapter
from mmpeft.data.checks import DataError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def test_a_diverged_run_stops_naming_the_step_and_writes_no_adapter(tmp_path, capsys):
    args = ["fit", "-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false",
            *QUICK, "--trainer.max_epochs=3", f"--run.dir={tmp_path}", "--model.init_args.lr=1e6",
            "--model.init_args.warmup_epochs=0"]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the training loss is nan" in err or "the training loss is inf" in err
    assert "at epoch " in err and ", step " in err and "the run diverged" in err and "lr=1000000.0" in err
    run = tmp_path / "quickstart" / "version_0"
    assert not (run / "adapter.safetensors").exists() and not (run / "summary.json").exists()
    for adapter in run.rglob("*.safetensors"):  # beside a checkpoint written before it diverged, if any
        tensors, _ = read_adapter(adapter)
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_the_divergence_message_names_the_last_good_checkpoint(tmp_path, capsys):
    """A run that was healthy for an epoch, then diverged: the epoch-end checkpoint is named for resuming."""
    args = ["fit", "-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false",
            *QUICK, "--trainer.max_epochs=3", f"--run.dir={tmp_path}", "--model.init_args.schedule=timm_cosine",
            "--model.init_args.warmup_epochs=1", "--model.init_args.warmup_lr=0.001",
            "--model.init_args.lr=1e6"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    (ckpt,) = (tmp_path / "quickstart" / "version_0" / "checkpoints").glob("epoch=0-*.ckpt")
    assert f"the last good checkpoint is {ckpt}" in err and "at epoch 1" in err


def test_nan_adapters_are_neither_written_nor_loaded(tmp_path):
    model = PeftModel(TimmViT("test_vit", img_size=32), "lora", num_classes=3)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(NonFiniteTensors, match="holds NaN or inf in 1 of .* diverged run"):
        load_adapter(model, path)
    with torch.no_grad():
        dict(model.named_parameters())[key].fill_(float("inf"))
    with pytest.raises(NonFiniteTensors, match="not writing adapter file"):
        save_adapter(model, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_a_nan_coordinate_in_scanobjectnn_is_found_before_training(tmp_path):
    from mmpeft.data.point_fixtures import write_scanobjectnn_fixture
    from mmpeft.data.scanobjectnn import ScanObjectNNDataModule, read_scanobjectnn_h5

    root = write_scanobjectnn_fixture(tmp_path / "scan", variant="OBJ_BG")
    (path,) = [p for p in root.rglob("training_objectdataset.h5")]
    import h5py

    with h5py.File(path, "r+") as file:
        data = file["data"][()]
        data[3, 7, 1] = np.nan
        data[5, 0, 0] = np.inf
        file["data"][...] = data
    with pytest.raises(DataError, match=r"(?s)samples with NaN or inf values.*data\[3\].*data\[5\]") as err:
        read_scanobjectnn_h5(path)
    assert "found before training" in str(err.value)
    with pytest.raises(DataError):
        ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=32).setup()


def test_result_files_hold_null_for_non_finite_metrics():
    metrics = finite_or_none({"test/loss": float("nan"), "test/acc": 0.5, "val/loss": float("inf")})
    assert metrics == {"test/loss": None, "test/acc": 0.5, "val/loss": None}
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
