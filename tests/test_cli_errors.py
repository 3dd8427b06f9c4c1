"""Errors that were unclear or late (issue 22 item 21): an mmpeft file given to import-lora, interrupted sweeps,
a full disk, two runs of one name started at once, pretraining ended by SIGTERM."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from mmpeft.cli import claim_version, main, run_cli


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


# -- a full disk -------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false",
          "--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
          "--trainer.log_every_n_steps=1"]  # fmt: skip
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() on a full disk raises: no file name


def fill_disk(monkeypatch, where: str) -> None:
    """Make one kind of run file hit a full disk, the way its writer reports it."""
    if where == "adapter":  # safetensors wraps Rust's io error in its own exception type
        from safetensors import SafetensorError

        full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                               'space left on device" })')  # fmt: skip

        def save_file(*args, **kwargs):
            raise full

        monkeypatch.setattr("mmpeft.core.state.save_file", save_file)
    elif where == "checkpoint":  # Lightning's fsspec write: a bare errno

        def atomic_save(checkpoint, path):
            raise ENOSPC

        monkeypatch.setattr("lightning_fabric.plugins.io.torch_io._atomic_save", atomic_save)
    else:
        real = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == where:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize(
    ("where", "named"),
    [("adapter", r"the adapter file (\S+/checkpoints/adapter-epoch=0-step=2\.safetensors)"),
     ("checkpoint", r"the checkpoint (\S+/checkpoints/epoch=0-step=2\.ckpt)"),
     ("summary.json", r"the run summary (\S+/version_0/summary\.json)")],
)  # fmt: skip
def test_a_full_disk_names_the_file_in_one_line(where, named, monkeypatch, tmp_path, capsys):
    fill_disk(monkeypatch, where)
    assert main(["fit", *DIGITS, f"--run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    found = re.fullmatch(rf"mmpeft: error: cannot write {named}: the disk is full \(No space left on device\); "
                         r"free space there, or write the run elsewhere \(--run.dir\), then rerun", err)  # fmt: skip
    assert found, err
    assert not Path(found.group(1)).exists() and not list(tmp_path.rglob("*.tmp")), "no partial file is left"


def test_a_full_disk_in_a_write_mmpeft_does_not_wrap_is_one_line(tmp_path, capsys, monkeypatch):
    def save(self):
        raise ENOSPC

    monkeypatch.setattr("lightning_fabric.loggers.csv_logs._ExperimentWriter.save", save)
    assert main(["fit", *DIGITS, f"--run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("mmpeft: error: cannot write a run file: the disk is full (No space left on device); free space "
                   "there, or write the run elsewhere (--run.dir), then rerun")  # fmt: skip


# -- two runs of one name at once ----------------------------------------------------------------------------


def test_two_runs_of_one_name_started_together_get_their_own_folders(tmp_path):
    """Both CLIs choose their run folder before either writes a file: each must get its own version_N (the
    second used to take the first's, and Lightning refused to overwrite the live run's config.yaml)."""
    args = [*DIGITS, f"--run.dir={tmp_path}", "--run.name=same"]
    first, second = run_cli(args, run=False), run_cli(args, run=False)
    dirs = [Path(cli.trainer.loggers[0].log_dir) for cli in (first, second)]
    assert dirs == [tmp_path / "same/version_0", tmp_path / "same/version_1"]
    for cli, folder in zip((first, second), dirs):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert (folder / "config.yaml").is_file() and (folder / "metrics.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["version_0", "version_1"]


def test_a_version_taken_after_the_listing_is_skipped_and_nothing_is_reused(tmp_path, monkeypatch):
    base = tmp_path / "run"
    (base / "version_0").mkdir(parents=True)
    (base / "version_0" / "metrics.csv").write_text("kept")
    (base / "version_3").mkdir()
    assert claim_version(base) == 4, "after the newest, never into a gap another run may be using"
    real_glob = Path.glob
    monkeypatch.setattr(
        Path, "glob", lambda self, pattern: [p for p in real_glob(self, pattern) if p.name < "version_5"]
    )
    (base / "version_5").mkdir()  # another run took it between the listing and the mkdir
    assert claim_version(base) == 6
    assert (base / "version_0" / "metrics.csv").read_text() == "kept"


# -- SIGTERM while a quickstart backbone pretrains -------------------------------------------------------------


def test_sigterm_during_quickstart_pretraining_says_so_and_caches_nothing(tmp_path):
    """The pretraining runs while the CLI builds the model, before Lightning's SIGTERM handler exists: the process
    used to vanish without a word. It now exits 143 with one line naming the epoch, and caches nothing."""
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    env = {**os.environ, "MMPEFT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    args = ["-c", str(ROOT / "configs/quickstart.yaml"), "--run.wandb=disabled", f"--run.dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "fit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    seen, deadline = b"", time.monotonic() + 300
    while b"pretraining the digits ViT" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stderr.read1(4096)
    assert b"pretraining the digits ViT" in seen, seen.decode(errors="replace")[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 143, err[-2000:]
    assert re.search(r"mmpeft: error: terminated by SIGTERM while pretraining the digits ViT \(upstream\) \(epoch "
                     r"\d+ of \d+\); nothing was cached", err), err[-2000:]  # fmt: skip
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.tmp"))
    assert "Traceback" not in err
