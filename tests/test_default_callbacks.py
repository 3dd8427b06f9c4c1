"""The callbacks a run needs are `trainer.callbacks` defaults (issue 23 item 3): present by default, kept when a
user adds one, dropped or configured by a config's own list; the EMA is a callback too; the stop on a
non-finite loss stays in the task."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from mmpeft.lab.lightning_cli import run_cli
from mmpeft.tasks.callbacks import DEFAULT_CALLBACKS, AdapterExport
from mmpeft.tasks.ema import EMACallback
from mmpeft.tasks.rng import RNGStateCheckpoint

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def built(tmp_path: Path, *extra: str):
    args = ["-c", QUICKSTART, "--model.init_args.backbone.init_args.pretrained=false", "--trainer.max_epochs=1",
            f"--run.dir={tmp_path}", "--run.wandb=disabled", *extra]  # fmt: skip
    return run_cli(args, run=False)


def names(cli) -> list[str]:
    return [type(c).__name__ for c in cli.trainer.callbacks]


def test_a_default_run_has_every_default_callback(tmp_path):
    found = names(built(tmp_path))
    assert all(path.rsplit(".", 1)[1] in found for path in DEFAULT_CALLBACKS)


def test_a_users_callback_is_added_to_the_defaults(tmp_path):
    cli = built(tmp_path, "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=3")  # fmt: skip
    found = names(cli)
    assert all(path.rsplit(".", 1)[1] in found for path in DEFAULT_CALLBACKS)
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath is None]
    assert checkpoint._every_n_train_steps == 3


def test_a_configs_own_list_turns_callbacks_off_and_configures_them(tmp_path):
    own = tmp_path / "callbacks.yaml"
    own.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "mmpeft.tasks.callbacks.AdapterExport", "init_args": {"filename": "mine.safetensors"}},
        {"class_path": "mmpeft.tasks.ema.EMACallback", "init_args": {"decay": 0.9}},
    ]}}))  # fmt: skip
    cli = built(tmp_path, "-c", str(own))
    assert "RNGStateCheckpoint" not in names(cli) and "RunStats" not in names(cli)
    (export,) = [c for c in cli.trainer.callbacks if isinstance(c, AdapterExport)]
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
    assert export.filename == "mine.safetensors" and ema.decay == 0.9


def test_ema_decay_on_the_task_adds_the_ema_callback(tmp_path):
    cli = built(tmp_path, "--model.init_args.ema_decay=0.99")
    assert [c.decay for c in cli.model.configure_callbacks()] == [0.99]
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\)"):
        built(tmp_path, "--model.init_args.ema_decay=1.5")


def test_resuming_without_the_rng_callback_says_it_is_not_exact(tmp_path):
    cli = built(tmp_path, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--run.name=r")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (ckpt,) = (tmp_path / "r" / "version_0" / "checkpoints").glob("*.ckpt")
    own = tmp_path / "no_rng.yaml"
    own.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "mmpeft.tasks.callbacks.AdapterExport"}]}}))
    resume = ["fit", "-c", QUICKSTART, "-c", str(own), "--model.init_args.backbone.init_args.pretrained=false",
              "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              f"--run.dir={tmp_path}", "--run.wandb=disabled", f"--ckpt_path={ckpt}"]  # fmt: skip
    with pytest.warns(UserWarning, match="not exact"):
        run_cli(resume)
    assert any(isinstance(c, RNGStateCheckpoint) for c in cli.trainer.callbacks)


def test_a_run_config_saved_before_the_defaults_gets_them_and_an_empty_list_gets_none(tmp_path):
    """Run configs written before the callbacks became defaults say `callbacks: null`: they mean the defaults."""
    old = Path(__file__).parent / "fixtures" / "run_configs_0.1" / "digits-quickstart.yaml"
    assert yaml.safe_load(old.read_text())["trainer"]["callbacks"] is None
    cli = run_cli(["fit", "-c", str(old), f"--run.dir={tmp_path}", "--run.wandb=disabled"])  # 1 batch, 1 epoch
    found = names(cli)
    assert (tmp_path / "quickstart" / "version_0" / "adapter.safetensors").is_file(), "AdapterExport ran"
    assert all(path.rsplit(".", 1)[1] in found for path in DEFAULT_CALLBACKS)
    assert "AdapterExport" not in names(built(tmp_path, "--trainer.callbacks=[]"))
