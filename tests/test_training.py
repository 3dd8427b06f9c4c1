"""Training through LightningCLI: YAML runs, frozen-through-fit, adapter files, resume, logging, errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.nn.modules.batchnorm import _BatchNorm

from mmpeft.cli import main, run_cli, wandb_mode
from mmpeft.core.modules import adapter_modules
from mmpeft.core.state import read_adapter
from mmpeft.lab.run_checks import RunRefused
from mmpeft.tasks.optim import param_groups, warmup_cosine


def write_config(tmp_path: Path, method="lora", epochs=1, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "mmpeft.tasks.ImageClassification",
            "init_args": {
                "backbone": {"class_path": "tests.toys.ToyDigitsBN"},
                "method": method,
                "lr": 0.01,
                "weight_decay": 0.01,
                "warmup_epochs": 0.5,
            },
        },
        "data": {"class_path": "mmpeft.data.DigitsDataModule", "init_args": {"task": "downstream", "batch_size": 64}},
        "trainer": {
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            **trainer,
        },  # fmt: skip
        "run": {"dir": str(tmp_path / "runs"), "name": "t", "wandb": "disabled"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp_path, *extra, **kw):
    return run_cli(["fit", "-c", str(write_config(tmp_path, **kw)), *extra])


def test_fit_from_yaml_writes_run_directory_without_clobbering(tmp_path, capsys):
    fit(tmp_path, "--run.test_after_fit=true")
    fit(tmp_path)
    run0, run1 = tmp_path / "runs/t/version_0", tmp_path / "runs/t/version_1"
    for run in (run0, run1):
        assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
        assert (run / "adapter.safetensors").is_file()
    saved = yaml.safe_load((run0 / "config.yaml").read_text())
    assert saved["model"]["init_args"]["method"] == "lora"
    rows = list(csv.DictReader((run0 / "metrics.csv").open()))
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/loss_step", "val/acc", "test/acc", "perf/step_ms", "perf/peak_mem_mb", "adapter/bytes"} <= keys
    out = capsys.readouterr().out
    assert "test/acc:" in out and "adapter file:" in out and "trainable parameters" in out


def test_print_config_round_trip(tmp_path, capsys):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", str(config), "--model.init_args.lr=0.123", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    cli = run_cli(["fit", "-c", str(tmp_path / "printed.yaml"), "--trainer.limit_train_batches=1",
                   "--trainer.limit_val_batches=1"])  # fmt: skip
    assert cli.model.hparams.lr == 0.123 and cli.model.method.name == "lora" and cli.trainer.global_step == 1
    assert yaml.safe_load(printed)["model"]["init_args"]["backbone"]["class_path"] == "tests.toys.ToyDigitsBN"


class PolicyProbe(pl.Callback):
    """Records the frozen modules' modes at every training batch, validation having run in between."""

    def __init__(self):
        self.checked = 0
        self.after_validation = False

    def on_validation_end(self, trainer, pl_module):
        self.after_validation = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        own = [p for p, _ in adapter_modules(model.backbone)]
        for name, module in model.backbone.named_modules():
            if isinstance(module, _BatchNorm):
                assert not module.training, f"frozen BatchNorm {name} in train mode"
            elif any(name.startswith(p) for p in own) and name:
                assert module.training
            elif model.method.frozen_mode == "eval":
                assert not module.training
        if self.after_validation:
            self.checked += 1


@pytest.mark.parametrize("method", ["lora", "linear", "adapter", "vpt", "ssf", "mosa"])
def test_frozen_means_frozen_through_fit_with_validation(tmp_path, method):
    cli = run_cli(["-c", str(write_config(tmp_path, method=method, epochs=2, val_check_interval=2))], run=False)
    probe = PolicyProbe()
    cli.trainer.callbacks.append(probe)
    model = cli.model.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.checked > 0, "validation ran between training batches"
    trainable = set(model.trainable_names())
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in trainable)
    for key, value in before.items():
        if key not in trainable:
            assert torch.equal(value, after[key]), f"{key} changed"
    assert any("running_mean" in k for k in before), "the backbone has BatchNorm statistics to check"
    if method == "mosa":  # experts move only inside their masks, through Trainer.fit
        from mmpeft.methods.mosa import MoSA

        for adapter in MoSA.adapters(model.backbone):
            for i, w in enumerate(adapter.up.weights):
                assert torch.all(w[~adapter.up.masks[i]] == 0)


def test_adapter_from_fit_reproduces_test_accuracy_exactly(tmp_path):
    cli = fit(tmp_path, "--run.test_after_fit=true", epochs=2)
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    adapter = tmp_path / "runs/t/version_0/adapter.safetensors"
    tensors, header = read_adapter(adapter)
    assert set(tensors) == set(cli.model.model.trainable_names()) and header["method"]["name"] == "lora"
    config = tmp_path / "config.yaml"
    tested = run_cli(["test", "-c", str(config), "--adapter", str(adapter)])
    assert float(tested.trainer.callback_metrics["test/acc"]) == accuracy
    with pytest.raises(RunRefused, match="randomly initialised head"):  # no adapter: nothing trained to test
        run_cli(["test", "-c", str(config)])


def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    first = fit(tmp_path, epochs=1)
    steps = first.trainer.global_step
    ckpts = list((tmp_path / "runs/t/version_0/checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    assert list((tmp_path / "runs/t/version_0/checkpoints").glob("adapter-epoch=0-step=*.safetensors"))
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {f"model.{k}" for k in first.model.model.trainable_state_dict()}, "trainable set only"
    second = fit(tmp_path, f"--ckpt_path={ckpts[0]}", epochs=2)
    assert second.trainer.global_step == 2 * steps
    trained = first.model.model.state_dict()
    resumed_start = {k.removeprefix("model."): v for k, v in state.items()}
    assert all(torch.equal(resumed_start[k], trained[k]) for k in resumed_start)


def test_adapter_for_another_backbone_is_refused_and_nothing_overwritten(tmp_path, capsys):
    fit(tmp_path)
    adapter = tmp_path / "runs/t/version_0/adapter.safetensors"
    good = adapter.read_bytes()
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other")
    text = other.read_text().replace("class_path: tests.toys.ToyDigitsBN", "class_path: tests.toys.ToyDigitsBN\n"
                                     "      init_args: {dim: 48}")  # fmt: skip
    other.write_text(text)
    assert main(["test", "-c", str(other), "--adapter", str(adapter)]) == 2
    assert "was made for backbone" in capsys.readouterr().err
    assert adapter.read_bytes() == good
    assert not (tmp_path / "other/runs/t/version_0/metrics.csv").exists()


def test_config_naming_an_unknown_method_is_a_clear_error(tmp_path, capsys):
    assert main(["fit", "-c", str(write_config(tmp_path, method="lorra"))]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'lorra'; did you mean lora?" in err
    assert not (tmp_path / "runs").exists()


def test_missing_data_directory_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path)
    args = ["fit", "-c", str(config), "--data=mmpeft.data.ImageListDataModule", f"--data.root={tmp_path / 'nope'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist. Expected layout" in err and "train.txt" in err


def test_wandb_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    assert wandb_mode("offline") == "offline"


def test_wandb_offline_run_needs_no_network(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    fit(tmp_path, "--run.wandb=auto", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    runs = list((tmp_path / "runs/t/wandb").glob("offline-run-*"))
    assert len(runs) == 1, "an offline W&B run was written beside the run's versions"


def test_optimizer_groups_exempt_1d_tensors_and_prompts():
    from mmpeft.core.method import create_method
    from mmpeft.core.model import PeftModel
    from tests.toys import ToyDigitsBN

    model = PeftModel(ToyDigitsBN(), create_method("adapter"), num_classes=3)
    model.backbone.prompt_tokens = torch.nn.Parameter(torch.zeros(2, 4, 32))  # a 3-D prompt stays exempt
    groups = param_groups(model, model.method, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in decayed) == (p.ndim > 1 and "prompt" not in name), name
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert math.isclose(f(55), 0.1 + 0.9 * 0.5, abs_tol=1e-9)
    assert math.isclose(f(100), 0.1)


def test_bf16_mixed_precision_trains_on_cpu_with_fp32_trainable_tensors(tmp_path):
    """`--trainer.precision bf16-mixed` on CPU: autocast to bfloat16 in the step, adapter and optimizer in fp32."""
    cli = fit(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=1", method="ssf")  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"
    trained = [p for p in cli.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained)
    states = [s for s in cli.trainer.optimizers[0].state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss_step"])))
