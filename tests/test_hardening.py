"""The command line with broken input, kills and reruns: one-line errors, honest exit codes, exact resume,
checkpoints that must fit the config, nothing written where it should not be, nothing evaluated quietly wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from mmpeft.cli import main, run_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]
DIGITS = ["-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false", *QUICK]
TINY_VIT = ["--model.init_args.backbone.init_args.name=test_vit", "--model.init_args.backbone.init_args.img_size=32",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """The README's own-images layout: train/val/test lists of "<relative path> <label>" and the images."""
    root = tmp_path_factory.mktemp("my_set")
    (root / "img").mkdir()
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 6), ("test", 6)):
        lines = []
        for i in range(count):
            pixels = (torch.rand(16, 16, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / "img" / f"{split}_{i}.png")
            lines.append(f"img/{split}_{i}.png {i % 3}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _summary(run_dir: Path) -> dict:
    (path,) = run_dir.glob("*/version_*/summary.json")
    return json.loads(path.read_text())


def test_the_readme_own_images_command_runs_and_predict_writes_its_predictions(image_folder, tmp_path, capsys):
    """`mmpeft fit -c configs/image_list.yaml --data.init_args.root <folder>` crashed on a num_classes
    hparams clash; `mmpeft predict` computed and saved nothing."""
    args = ["-c", str(ROOT / "configs/image_list.yaml"), f"--data.init_args.root={image_folder}", *TINY_VIT, *QUICK]
    assert main(["fit", *args, "--trainer.max_epochs=1", f"--run.dir={tmp_path / 'fit'}"]) == 0
    summary = _summary(tmp_path / "fit")
    assert "test/acc" in summary["metrics"] and summary["adapter"]
    assert main(["predict", *args, f"--adapter={summary['adapter']}", f"--run.dir={tmp_path / 'predict'}"]) == 0
    (csv,) = (tmp_path / "predict").glob("*/version_*/predictions.csv")
    rows = csv.read_text().splitlines()
    assert rows[0] == "id,prediction,probability" and len(rows) == 7
    assert rows[1].startswith("img/test_0.png,") and 0 <= int(rows[1].split(",")[1]) < 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.lr", "abc"], "model.lr: Expected a float"),
        (["--data.init_args.bogus", "3"], "data: Option 'bogus' is not accepted"),
        (["--model.init_args.method", "lroa"], "unknown method 'lroa'; did you mean lora?"),
        (["--run.dir", "/proc/not-here"], "/proc/not-here"),
    ],
)
def test_errors_are_one_line_naming_the_key_and_the_debug_flag_shows_the_traceback(args, expected, capsys, tmp_path):
    code = main(["fit", *DIGITS, "--trainer.max_epochs=1", *args] + ([] if "--run.dir" in args else
                [f"--run.dir={tmp_path}"]))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mmpeft: error: ") and expected in err[0], err
    with pytest.raises(Exception):  # noqa: B017 - --debug re-raises whatever it was, with its traceback
        main(["fit", *DIGITS, "--debug", *args] + ([] if "--run.dir" in args else [f"--run.dir={tmp_path}"]))


def test_a_missing_config_file_is_named(capsys):
    assert main(["fit", "-c", "configs/nope.yaml"]) == 2
    assert "configs/nope.yaml" in capsys.readouterr().err


def _fit_with_checkpoints(tmp_path: Path, name: str, ckpt: str | None = None, epochs: int = 4):
    args = [*DIGITS[:2], "--model.init_args.backbone.init_args.pretrained=false", f"--trainer.max_epochs={epochs}",
            f"--run.dir={tmp_path}", f"--run.name={name}", *QUICK[:2], "--data.init_args.batch_size=64"]  # fmt: skip
    cli = run_cli(args, run=False)
    cli.trainer.callbacks.append(ModelCheckpoint(dirpath=tmp_path / f"{name}-every", every_n_epochs=1, save_top_k=-1))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    return metrics, cli.model.model.trainable_state_dict()


def test_resuming_from_an_end_of_epoch_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """The training order is a function of (seed, epoch) and the checkpoint carries the RNG states."""
    full_metrics, full_weights = _fit_with_checkpoints(tmp_path, "full")
    (ckpt,) = (tmp_path / "full-every").glob("epoch=1-*.ckpt")
    resumed_metrics, resumed_weights = _fit_with_checkpoints(tmp_path, "resumed", str(ckpt))
    for key in ("val/acc", "val/loss"):
        assert resumed_metrics[key] == pytest.approx(full_metrics[key], abs=1e-6)
    assert max((full_weights[k] - resumed_weights[k]).abs().max().item() for k in full_weights) <= 1e-6
    kept = {p.name for p in (tmp_path / "full" / "version_0" / "checkpoints").iterdir()}
    assert sum(name.startswith("adapter-") for name in kept) == 1, f"one adapter beside the kept checkpoint: {kept}"


def test_a_checkpoint_of_another_method_is_refused(tmp_path, capsys):
    _fit_with_checkpoints(tmp_path, "lora", epochs=1)
    (ckpt,) = (tmp_path / "lora-every").glob("*.ckpt")
    linear = ["-c", str(ROOT / "configs/digits/linear.yaml")]
    code = main(["test", *DIGITS, *linear, f"--ckpt_path={ckpt}", f"--run.dir={tmp_path / 'test'}"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit this config" in err and "name='lora' in the checkpoint vs 'linear'" in err


def test_evaluating_an_untrained_head_is_refused(tmp_path, capsys):
    assert main(["test", *DIGITS, f"--run.dir={tmp_path}"]) == 2
    assert "randomly initialised head" in capsys.readouterr().err and not list(tmp_path.rglob("*.csv"))


def test_with_the_logger_off_nothing_lands_in_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = tmp_path / "runs"
    assert main(["fit", *DIGITS, "--trainer.max_epochs=1", "--trainer.logger=false", f"--run.dir={runs}"]) == 0
    assert not list(work.iterdir()), f"files written to the working directory: {list(work.iterdir())}"
    (adapter,) = runs.glob("quickstart/version_0/adapter.safetensors")
    assert (adapter.parent / "summary.json").is_file()


def test_weights_null_on_the_command_line_means_no_file():
    cli = run_cli([*DIGITS, "--model.init_args.backbone.init_args.weights=null"], run=False)
    assert cli.config["model"]["init_args"]["backbone"]["init_args"]["weights"] in (None, "None")


def test_a_test_after_fit_without_a_test_split_is_refused_before_training(tmp_path, capsys):
    from mmpeft.data.fixtures import write_vtab_fixture

    data = write_vtab_fixture(tmp_path / "vtab", tasks=["eurosat"])
    args = ["fit", "-c", str(ROOT / "configs/vtab/lora.yaml"), f"--data.init_args.root={data}",
            "--data.init_args.task=eurosat", "--data.init_args.protocol=tune", f"--run.dir={tmp_path / 'runs'}",
            *TINY_VIT, *QUICK]  # fmt: skip
    started = time.perf_counter()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no test split" in err and "protocol final" in err
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and time.perf_counter() - started < 60


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mmpeft.cli", "fit", *DIGITS, "--trainer.max_epochs=200", f"--run.dir={tmp_path}"]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "quickstart" / "version_0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and "val/acc" in metrics.read_text()):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    resume = next(line for line in err.splitlines() if "resume with:" in line).split("resume with: mmpeft ", 1)[1]
    (ckpt,) = (tmp_path / "quickstart" / "version_0" / "checkpoints").glob("terminated-*.ckpt")
    assert str(ckpt) in resume
    epoch = int(ckpt.stem.split("epoch=")[1].split("-")[0])
    again = resume.replace("--trainer.max_epochs=200", f"--trainer.max_epochs={epoch + 2}").split()
    done = subprocess.run([sys.executable, "-m", "mmpeft.cli", *again], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Restored all states from the checkpoint" in done.stdout + done.stderr
