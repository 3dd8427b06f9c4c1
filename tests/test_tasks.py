"""Task families beyond classification, heads from YAML, per-method lr groups, EMA, adapter-file
compatibility, and `mmpeft fit` on more than one process (DDP on CPU)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn

from mmpeft.backbones import DigitsViT
from mmpeft.cli import main, run_cli
from mmpeft.core.heads import build_head, head_spec
from mmpeft.core.model import PeftModel
from mmpeft.core.state import FORMAT, adapter_from_file, load_adapter, read_adapter, save_adapter
from mmpeft.tasks import ImageClassification
from mmpeft.tasks.ema import TrainableEMA

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def fit(config: str, tmp_path: Path, *extra: str) -> dict:
    """`mmpeft fit -c CONFIG` in this process, on a small budget; returns the run's summary.json."""
    args = ["fit", "-c", str(ROOT / config), f"--run.dir={tmp_path}", "--trainer.max_epochs=1", *QUICK, *extra]
    assert main(args) == 0
    (summary,) = tmp_path.glob("*/version_0/summary.json")
    return json.loads(summary.read_text())


# -- task families --------------------------------------------------------------------------------------


def test_toy_regression_trains_without_a_head_and_selects_on_val_loss(tmp_path):
    summary = fit("configs/toy/regression.yaml", tmp_path, "--trainer.limit_train_batches=4",
                  "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2")  # fmt: skip
    assert (summary["monitor"], summary["monitor_mode"]) == ("val/loss", "min")
    assert 0 < summary["metrics"]["val/loss"] < 10 and "test/loss" in summary["metrics"]
    assert summary["trainable"] == summary["trainable_no_head"] > 0  # no head
    tensors, header = read_adapter(summary["adapter"])
    assert header["head"] is None and not any(k.startswith("head.") for k in tensors)


def test_toy_denoising_on_the_tiny_unet_through_mmpeft_fit(tmp_path):
    summary = fit("configs/toy/denoising.yaml", tmp_path, "--trainer.limit_train_batches=3",
                  "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=1")  # fmt: skip
    assert summary["monitor"] == "val/loss" and torch.isfinite(torch.tensor(summary["metrics"]["val/loss"]))
    assert summary["trainable"] == 23_040  # LoRA r=4 on to_q, to_k, to_v, to_out.0 of the (32, 64) UNet
    tensors, header = read_adapter(summary["adapter"])
    assert header["backbone"]["name"] == "tiny_sd_unet" and len(tensors) == 4 * 2 * 12


def test_denoising_validation_noise_is_the_same_every_evaluation():
    from mmpeft.tasks import Denoising

    task = Denoising(backbone=_tiny_unet(), method="lora")
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 32)
    draws = []
    for _ in range(2):
        task.on_validation_epoch_start()
        draws.append(task.prepare_batch((latents, cond), "val"))
    assert torch.equal(draws[0][0].x, draws[1][0].x) and torch.equal(draws[0][1]["target"], draws[1][1]["target"])
    train = task.prepare_batch((latents, cond), "train")
    assert not torch.equal(train[1]["target"], draws[0][1]["target"])
    assert train[0].cond is cond and train[0].timestep.shape == (2,)


def _tiny_unet():
    from tests.conftest import tiny_unet

    return tiny_unet()


# -- heads --------------------------------------------------------------------------------------------


def test_mlp_bn_head_from_yaml_trains_saves_and_rebuilds_from_the_adapter_file(tmp_path):
    head = "{name: mlp, hidden: [32, 32], norm: batch, dropout: 0.5}"
    args = ["fit", "-c", str(ROOT / "configs/quickstart.yaml"), f"--run.dir={tmp_path}", "--trainer.max_epochs=2",
            "--model.init_args.backbone.init_args.pretrained=false", f"--model.init_args.head={head}",
            "--run.test_after_fit=false", *QUICK]  # fmt: skip
    cli = run_cli(args[1:], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trained = cli.model.model.eval()
    assert isinstance(trained.head, nn.Sequential) and isinstance(trained.head[1], nn.BatchNorm1d)
    assert trained.head[1].num_batches_tracked > 0, "the head's BatchNorm trained"
    (adapter,) = tmp_path.glob("*/version_0/adapter.safetensors")
    tensors, header = read_adapter(adapter)
    assert header["head"] == {"name": "mlp", "num_classes": 10, "hidden": [32, 32], "norm": "batch",
                              "dropout": 0.5, "activation": "relu"}  # fmt: skip
    assert "head.1.running_mean" in tensors
    pristine = copy.deepcopy(trained).unload()  # the run's frozen backbone, without the method
    rebuilt = adapter_from_file(pristine, adapter).eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))
    with pytest.raises(Exception, match="holds head"):
        load_adapter(PeftModel(DigitsViT(pretrained=False), rebuilt.method, num_classes=10), adapter)


def test_head_specs_inits_and_errors():
    torch.manual_seed(0)
    spec = head_spec({"name": "linear", "init": "zeros"}, 5)
    assert spec == {"name": "linear", "init": "zeros", "num_classes": 5}
    assert torch.count_nonzero(build_head(spec, 8).weight) == 0
    wide = build_head(head_spec({"name": "linear", "init": "trunc_normal:0.02"}, 500), 500)
    assert abs(wide.weight.std().item() - 0.02) < 0.003  # timm's trunc_normal_ cuts at ±2 absolute: a plain normal here
    assert torch.count_nonzero(build_head(head_spec("linear", 5), 8, default_init="zeros").weight) == 0
    with pytest.raises(Exception, match="unknown head 'mlpp'"):
        head_spec("mlpp", 3)
    with pytest.raises(Exception, match=r"no option\(s\) \['hiden'\]"):
        head_spec({"name": "mlp", "hiden": [3]}, 3)


# -- optimizer groups -----------------------------------------------------------------------------------


class LrProbe(pl.Callback):
    def __init__(self, step: int):
        self.step, self.lrs = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}


def test_a_method_s_lr_group_gets_exactly_its_multiple_after_warmup():
    """LoRA+ declares B at 10x the run's lr; after the warmup (2 of 4 steps) the factor is exactly 1."""
    from mmpeft.data import DigitsDataModule

    task = ImageClassification(backbone=DigitsViT(pretrained=False), method={"name": "lora", "b_lr_ratio": 10.0},
                               num_classes=10, lr=0.01, warmup_epochs=1.0, weight_decay=0.05)  # fmt: skip
    probe = LrProbe(step=2)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False, callbacks=[probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16))
    assert probe.lrs == pytest.approx({"lora_B": 0.1, "decay": 0.01, "no_decay": 0.01})
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    b_params = {id(p) for n, p in task.model.named_parameters() if n.endswith(".B")}
    assert {id(p) for p in groups["lora_B"]["params"]} == b_params
    assert groups["lora_B"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0


# -- EMA ----------------------------------------------------------------------------------------------


class Recorder(pl.Callback):
    """The trainable weights after every optimizer step (before the task's EMA update runs)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        live = pl_module.model.state_dict()
        self.steps.append({k: live[k].clone() for k in pl_module.model.trainable_state_dict()})


def test_ema_weights_equal_a_hand_computed_average_after_three_steps(tmp_path):
    from mmpeft.data import DigitsDataModule

    torch.manual_seed(0)
    decay = 0.7
    task = ImageClassification(backbone=DigitsViT(pretrained=False), method="lora", num_classes=10, lr=0.05,
                               ema_decay=decay)  # fmt: skip
    start = {k: v.clone() for k, v in task.model.trainable_state_dict().items()}
    recorder = Recorder()
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, callbacks=[recorder],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16))
    assert len(recorder.steps) == 3
    expected = dict(start)
    for weights in recorder.steps:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    final = task.model.trainable_state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=1e-6)
    assert not torch.equal(final["head.weight"], recorder.steps[-1]["head.weight"]), "the EMA, not the last step"
    save_adapter(task.model, tmp_path / "a.safetensors")
    tensors, _ = read_adapter(tmp_path / "a.safetensors")
    torch.testing.assert_close(tensors["head.weight"], expected["head.weight"], atol=1e-6, rtol=1e-6)


def test_ema_swap_is_its_own_inverse():
    model = PeftModel(DigitsViT(pretrained=False), "lora", num_classes=3)
    ema = TrainableEMA(model, 0.9)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    before = model.head.weight.clone()
    ema.swap(model)
    assert not torch.equal(model.head.weight, before)
    ema.swap(model)
    assert torch.equal(model.head.weight, before)
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\)"):
        TrainableEMA(model, 1.0)


# -- adapter file compatibility -------------------------------------------------------------------------


def test_a_file_written_before_a_defaulted_option_existed_still_loads(tmp_path):
    """Files record the mmpeft version; a method option added later takes its default when such a file loads,
    while a value that differs is still refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = PeftModel(DigitsViT(pretrained=False), "lora", num_classes=3)
    save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == FORMAT and meta["mmpeft_version"]
    method = json.loads(meta["method"])
    for newer in ("b_lr_ratio", "param_dtype"):  # options added after the file's era
        method["config"].pop(newer)
    old = {k: v for k, v in meta.items() if k not in ("mmpeft_version", "head")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**old, "method": json.dumps(method)})
    torch.manual_seed(0)
    fresh = PeftModel(DigitsViT(pretrained=False), "lora", num_classes=3)
    load_adapter(fresh, tmp_path / "old.safetensors")
    assert torch.equal(fresh.head.weight, model.head.weight)
    torch.manual_seed(0)  # the same frozen weights the file was trained on
    assert adapter_from_file(DigitsViT(pretrained=False), tmp_path / "old.safetensors").method.b_lr_ratio == 1.0
    method["config"]["r"] = 4
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**old, "method": json.dumps(method)})
    with pytest.raises(Exception, match=r"r=4 in the file vs 8"):
        load_adapter(fresh, tmp_path / "other.safetensors")
    method["config"]["rank_typo"] = 8
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={**old, "method": json.dumps(method)})
    with pytest.raises(Exception, match="does not have"):
        load_adapter(fresh, tmp_path / "future.safetensors")


# -- DDP on CPU -----------------------------------------------------------------------------------------


def _cli(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmpeft.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _last_row(metrics: Path, keys: tuple[str, ...]) -> list[float]:
    rows = [line.split(",") for line in metrics.read_text().splitlines() if line]
    header = rows[0]
    found = [row for row in rows[1:] if row[header.index(keys[0])]]
    return [float(found[-1][header.index(key)]) for key in keys]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_syncs_metrics_and_writes_one_adapter(tmp_path):
    """`mmpeft fit` under DDP (gloo) on 2 ranks of 18 ends where one process with batches of 36 ends: the 270 training
    images cut the same way (the distributed sampler's one permutation, rank r taking every other index, so the
    ranks' batches together are the one process's batch) and the gradients averaged, so the final validation
    metrics and adapter agree within float rounding (tolerance: 1e-5 on the loss, 1e-4 on any adapter weight, the
    same accuracy). `mmpeft test` of the adapter on 2 ranks gives exactly the metrics of 1 rank: the 161 test
    images split 81 + 80 without padding (a padded sampler would score 162)."""
    common = ["-c", "configs/quickstart.yaml", "--model.init_args.backbone.init_args.pretrained=false",
              "--data.init_args.batch_size=18", "--trainer.accelerator=cpu", *QUICK]  # fmt: skip
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    done = _cli(["fit", *common, *ddp, "--trainer.max_epochs=1", f"--run.dir={tmp_path / 'fit'}",
                 "--run.name=ddp"], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "fit" / "ddp"
    assert [p.name for p in run.iterdir()] == ["version_0"], "one run directory, written by rank 0"
    adapters = sorted(p.relative_to(run) for p in run.rglob("adapter*.safetensors"))
    assert [str(p) for p in adapters] == ["version_0/adapter.safetensors",
                                          "version_0/checkpoints/adapter-epoch=0-step=8.safetensors"]  # fmt: skip
    adapter = run / "version_0" / "adapter.safetensors"
    one = ["--trainer.strategy=ddp", "--trainer.devices=1", "--data.init_args.batch_size=36"]  # the same sampler
    done = _cli(["fit", *common, *one, "--trainer.max_epochs=1", f"--run.dir={tmp_path / 'fit'}", "--run.name=one"],
                tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    keys = ("val/acc", "val/loss")
    (acc, loss), (one_acc, one_loss) = (_last_row(run.parent / name / "version_0" / "metrics.csv", keys)
                                        for name in ("ddp", "one"))  # fmt: skip
    assert acc == one_acc and loss == pytest.approx(one_loss, abs=1e-5), ((acc, loss), (one_acc, one_loss))
    ddp_weights, one_weights = (load_file(run.parent / name / "version_0" / "adapter.safetensors")
                                for name in ("ddp", "one"))  # fmt: skip
    assert ddp_weights.keys() == one_weights.keys()
    gap = max((ddp_weights[k] - one_weights[k]).abs().max().item() for k in ddp_weights)
    assert gap < 1e-4, f"the adapters differ by {gap}"
    scores = []
    for name, extra in (("one", ["--trainer.devices=1"]), ("two", ddp)):
        out = tmp_path / name
        done = _cli(["test", *common, *extra, f"--adapter={adapter}", f"--run.dir={out}"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [line for line in (next(out.glob("*/version_0/metrics.csv"))).read_text().splitlines() if line]
        header, values = rows[0].split(","), rows[-1].split(",")
        scores.append([float(values[header.index(key)]) for key in ("test/acc", "test/loss")])
    (acc, loss), (ddp_acc, ddp_loss) = scores
    assert ddp_acc == pytest.approx(acc, abs=1e-6) and ddp_loss == pytest.approx(loss, abs=1e-5) and 0 < acc < 1
    assert round(acc * 161) == pytest.approx(acc * 161, abs=1e-3), "a whole number of the 161 test images"


def test_evaluation_loaders_shard_without_padding_under_ddp(monkeypatch):
    """The sampler an evaluation split gets on 2 ranks: 161 samples as 81 + 80, each exactly once."""
    from torch.utils.data import TensorDataset

    from mmpeft.data import sampling

    dataset = TensorDataset(torch.arange(161))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = sampling.split_loader(dataset, 18, shuffle=False)
        seen.append([int(i) for (batch,) in loader for i in batch])
    assert [len(s) for s in seen] == [81, 80] and sorted(seen[0] + seen[1]) == list(range(161))


def test_learned_variance_vlb_is_the_improved_ddpm_bound():
    """Zero at the true posterior, positive elsewhere; trains only the variance channels."""
    from diffusers import DDPMScheduler

    from mmpeft.tasks.denoising import learned_variance_vlb

    scheduler = DDPMScheduler(beta_schedule="linear")
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 900])
    xt = scheduler.add_noise(x0, noise, t)
    targets = {"latents": x0, "noisy": xt, "timesteps": t, "target": noise}
    variance = torch.full((3, 4, 2, 2), -1.0, requires_grad=True)  # v = -1: the posterior variance itself
    exact = learned_variance_vlb(torch.cat([noise, variance], 1), targets, scheduler)
    assert exact.abs().max() < 1e-4, "the true eps and the posterior variance give a zero KL"
    eps = torch.randn(3, 4, 2, 2, requires_grad=True)
    off = learned_variance_vlb(torch.cat([eps, variance], 1), targets, scheduler)
    assert (off > exact).all()
    off.sum().backward()
    assert (eps.grad is None or not eps.grad.any()) and variance.grad.abs().sum() > 0
