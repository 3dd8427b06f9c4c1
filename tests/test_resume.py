"""Exact resume for every task family: a run resumed from any checkpoint mmpeft writes — mid-epoch or at an
epoch's end — ends with the uninterrupted run's adapter, bit for bit, and continues the same version folder's
metrics; a resume with a changed option is refused; training data is a function of (seed, epoch, position)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from mmpeft.cli import main
from mmpeft.core.state import read_adapter
from mmpeft.data.sampling import EpochBatches, EpochShuffle, ResumableLoader, split_loader
from tests.toys import write_ramp_images

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]
EVERY_STEP = ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
              "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Ten 64x64 training images (batches of 4: 4 + 4 + 2, three steps an epoch) and four for validation."""
    return write_ramp_images(tmp_path_factory.mktemp("images"), {"train": 10, "val": 4})


# family -> (config arguments, steps per epoch); each trains with randomness in data and model
FAMILIES = {
    "classification": (
        [
            "-c",
            "configs/quickstart.yaml",
            "--model.init_args.backbone.init_args.pretrained=false",
            "--data.init_args.batch_size=64",
            "--data.init_args.shift=1",
        ],
        5,
    ),  # fmt: skip
    "timm_cosine": (
        [
            "-c",
            "configs/quickstart.yaml",
            "--model.init_args.backbone.init_args.pretrained=false",
            "--data.init_args.batch_size=64",
            "--data.init_args.shift=1",
            "--model.init_args.schedule=timm_cosine",  # timm's scheduler state, stepped per epoch
            "--model.init_args.warmup_epochs=1",
            "--model.init_args.warmup_lr=1e-5",
        ],
        5,
    ),  # fmt: skip
    "point": (
        [
            "-c",
            "configs/point/quickstart.yaml",
            "--model.init_args.backbone.init_args.pretrained=false",
            "--data.init_args.train_per_class=10",
            "--data.init_args.val_per_class=4",
            "--data.init_args.num_workers=1",
        ],
        3,
    ),  # fmt: skip
    "diffusion": (["-c", "configs/diffusion/lora.yaml", "--data.init_args.batch_size=4"], 3),
    "dit": (["-c", "configs/diffusion/lora_dit.yaml", "--data.init_args.batch_size=4"], 3),
    "dreambooth": (  # 14 instance images (+ class images) per epoch in batches of 7 + 7: the diffusers pitfall
        [
            "-c",
            "configs/diffusion/dreambooth_lora.yaml",
            "--data.init_args.batch_size=7",
            "--data.init_args.num_class_images=4",
            "--data.init_args.class_steps=2",
            "--model.init_args.samples=null",
        ],
        2,
    ),  # fmt: skip
}


def _args(family: str, images: Path, run_dir: Path) -> list[str]:
    config, _ = FAMILIES[family]
    config = [str(ROOT / a) if a.startswith("configs/") else a for a in config]
    data = [f"--data.init_args.root={images}"] if family in ("diffusion", "dit") else []
    if family == "dreambooth":  # the class images are made once, by the first run, and reused by every later one
        data = [f"--data.init_args.instance_dir={images / 'img'}", f"--data.init_args.class_dir={images / 'class'}"]
    return ["fit", *config, *data, *QUICK, "--trainer.max_epochs=2", f"--run.dir={run_dir}", "--run.name=run"]


def _step(path: Path) -> int:
    return int(path.stem.rsplit("step=", 1)[-1]) if "step=" in path.stem else -1


def _rows(path: Path, drop_epoch_aggregates: bool) -> list[dict[str, str]]:
    """metrics.csv without timing and memory (they differ between any two runs) and the sizes of the adapter
    files written beside checkpoints, in a fixed order (rows are written in the order Lightning flushes them)."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    out = []
    for row in rows:
        kept = {k: v for k, v in row.items() if not k.startswith(("perf/", "adapter/")) and v != ""}
        if drop_epoch_aggregates:
            kept = {k: v for k, v in kept.items() if not (k.startswith("train/") and k.endswith("_epoch"))}
        if set(kept) - {"step", "epoch"}:
            out.append(kept)
    return sorted(out, key=lambda r: sorted(r.items()))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """One uninterrupted two-epoch run per family, with a checkpoint after every step."""
    runs = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"full-{family}")
        assert main([*_args(family, images, folder), *EVERY_STEP]) == 0
        runs[family] = folder / "run" / "version_0"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("where", ["mid-epoch", "end-of-epoch"])
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(family, where, uninterrupted, images, tmp_path):
    full = uninterrupted[family]
    steps = FAMILIES[family][1]
    step = steps + 1 if where == "mid-epoch" else steps  # one batch into epoch 1, or the end of epoch 0
    epoch = step // steps if where == "mid-epoch" else 0
    # the run killed at that checkpoint: its folder as it was on disk, with everything it wrote after it
    killed = tmp_path / "run" / "version_0"
    shutil.copytree(full, killed)
    for later in [*killed.glob("checkpoints/*"), killed / "adapter.safetensors", killed / "summary.json"]:
        if later.name.endswith(".json") or later.name == "adapter.safetensors" or _step(later) > step:
            later.unlink()  # written after the kill: not there
    (ckpt,) = (killed / "checkpoints").glob(f"epoch={epoch}-step={step}.ckpt")
    assert main([*_args(family, images, tmp_path), f"--ckpt_path={ckpt}"]) == 0
    assert not (tmp_path / "run" / "version_1").exists(), "a resumed run continues its own version folder"
    theirs, _ = read_adapter(full / "adapter.safetensors")
    ours, _ = read_adapter(killed / "adapter.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs), "bit-identical adapter"
    mid = where == "mid-epoch"
    assert _rows(killed / "metrics.csv", mid) == _rows(full / "metrics.csv", mid), "the same metrics, in one file"
    assert (killed / "config.yaml").is_file() and (killed / "config-resume-1.yaml").is_file()


def test_a_resume_with_a_changed_option_is_refused_and_a_longer_run_is_applied(images, tmp_path, capsys):
    args = [*_args("classification", images, tmp_path), "--trainer.max_epochs=1"]
    assert main(args) == 0
    (ckpt,) = (tmp_path / "run" / "version_0" / "checkpoints").glob("*.ckpt")
    changed = main([*args, "--model.init_args.lr=0.1", f"--ckpt_path={ckpt}"])
    err = capsys.readouterr().err
    assert (
        changed == 2 and "model.init_args.lr=0.003 in the checkpoint vs 0.1" in err and "would not take effect" in err
    )
    assert not (tmp_path / "run" / "version_1").exists()
    longer = main([*args, "--trainer.max_epochs=2", "--data.init_args.num_workers=1", f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert longer == 0 and "trainer.max_epochs 1 in the checkpoint -> 2: applied" in out


# -- the data side ---------------------------------------------------------------------------------------------
class _Augmented(Dataset):
    """Items whose loading draws from torch's, NumPy's and Python's global RNGs (as augmentations do)."""

    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random()])


def _epochs(loader, epochs: int = 2) -> list[torch.Tensor]:
    out = []
    for epoch in range(epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_training_batches_depend_on_seed_epoch_and_position_only():
    plain = _epochs(split_loader(_Augmented(), 4, shuffle=True, seed=3))
    torch.manual_seed(123)  # the global RNG state before loading does not matter
    workers = _epochs(split_loader(_Augmented(), 4, shuffle=True, seed=3, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(plain, workers)), "the same batches with 0 or 2 workers"
    assert [len(b) for b in plain] == [4, 5, 4, 5], "no final batch of one: folded into the previous batch"
    first, second = torch.cat(plain[:2]), torch.cat(plain[2:])
    assert sorted(first[:, 0].tolist()) == list(range(9)) and not torch.equal(first[:, 1:], second[:, 1:])
    other_seed = _epochs(split_loader(_Augmented(), 4, shuffle=True, seed=4))
    assert not torch.equal(torch.cat(other_seed), torch.cat(plain))


def test_the_loader_state_resumes_mid_epoch_and_drop_last_drops_the_partial_batch():
    loader = split_loader(_Augmented(), 4, shuffle=True, seed=0)
    assert isinstance(loader, ResumableLoader) and isinstance(loader.batch_sampler, EpochBatches)
    reference = _epochs(loader)
    loader = split_loader(_Augmented(), 4, shuffle=True, seed=0)
    loader.batch_sampler.sampler.set_epoch(1)
    iterator = iter(loader)
    first = next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 1} and torch.equal(first, reference[2])
    resumed = split_loader(_Augmented(), 4, shuffle=True, seed=0)
    resumed.load_state_dict(state)
    resumed.batch_sampler.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == [reference[3].tolist()], "the epoch continues at its next batch"
    finished = split_loader(_Augmented(), 4, shuffle=True, seed=0)
    finished.load_state_dict({"epoch": 1, "batches": 2})  # the epoch was complete: nothing to skip
    assert finished.batch_sampler.resume_point is None
    dropping = split_loader(_Augmented(), 4, shuffle=True, seed=0, drop_last=True)
    assert [len(b) for b in dropping] == [4, 4] and len(dropping) == 2
    assert len(EpochBatches(EpochShuffle(9, 0), 4)) == 2 and len(EpochBatches(EpochShuffle(1, 0), 4)) == 1
