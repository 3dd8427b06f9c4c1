"""The suite passes whatever the user's shell exports (issue 22 item 22): `WANDB_MODE=offline` as the README
suggests for offline users, a W&B key, another `HOME`, a stale `MMPEFT_CACHE`, one thread. conftest.py replaces the
shell's environment by the suite's own before any test module is imported, and restores it around every test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# tests that read W&B's mode, the bench's environment, the cache and the seed; they failed with WANDB_MODE=offline
TOUCHY = [
    "tests/test_bench_and_packaging.py::test_bench_live_allocator_reaches_the_workers_and_names_the_result",
    "tests/test_plot.py::test_log_table_to_wandb_disabled_writes_nothing",
    "tests/test_training.py::test_wandb_is_offline_without_a_key",
    "tests/test_resume.py::test_training_batches_depend_on_seed_epoch_and_position_only",
]


def test_the_suite_environment_replaces_the_shells():
    assert os.environ["WANDB_MODE"] == "disabled" and "WANDB_API_KEY" not in os.environ
    assert "PL_GLOBAL_SEED" not in os.environ, "a seed a test before this one exported does not leak"
    home = Path(os.environ["HOME"])
    cache = Path(os.environ["MMPEFT_CACHE"])
    shared = f"mmpeft-tests-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID')}"  # the run's, shared by its workers
    assert home.name.startswith("mmpeft-tests-home-") and (cache.is_relative_to(home) or cache.name == shared)
    os.environ["PL_GLOBAL_SEED"] = "7"  # as seed_everything does; the fixture removes it after this test
    torch.set_num_threads(1)


def test_a_hostile_shell_environment_changes_nothing(tmp_path):
    hostile = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},  # a shell, not a worker
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_DIR": str(tmp_path / "not-here"),
        "HOME": str(tmp_path / "home"),
        "MMPEFT_CACHE": str(tmp_path / "stale-cache"),
        "PL_GLOBAL_SEED": "123",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *TOUCHY]
    done = subprocess.run(command, cwd=ROOT, env=hostile, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(TOUCHY)} passed" in done.stdout
    assert not (tmp_path / "not-here").exists() and not (tmp_path / "stale-cache").exists()
