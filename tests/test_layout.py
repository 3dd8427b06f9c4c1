"""The package layout of issue 23: old import paths keep working (with a DeprecationWarning naming the new one),
the version has one source, and `python -m mmpeft.quickstart` stays a short entry."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import mmpeft

MOVED = {  # old module -> (new module, a name both give)
    "mmpeft.sweep": ("mmpeft.lab.sweep", "run_sweep"),
    "mmpeft.bench": ("mmpeft.lab.bench", "run_bench"),
    "mmpeft.plot": ("mmpeft.lab.plot", "plot_tables"),
    "mmpeft.results": ("mmpeft.lab.results", "results_table"),
    "mmpeft.run_checks": ("mmpeft.lab.run_checks", "check_checkpoint_fits"),
    "mmpeft.memory": ("mmpeft.lab.memory", "saved_tensors"),
    "mmpeft.method_info": ("mmpeft.methods.info", "describe_method"),
    "mmpeft.interop.tiny_sd": ("mmpeft.backbones.tiny_diffusers", "tiny_sd_folder"),
    "mmpeft.backbones.point_ops": ("mmpeft.ops.point", "group"),
    "mmpeft.data.point": ("mmpeft.data.scanobjectnn", "ScanObjectNNDataModule"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_still_imports_and_says_where_it_went(old, monkeypatch):
    new, name = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match="moved"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_memory_module_keeps_the_process_peak_and_machine_description(monkeypatch):
    monkeypatch.delitem(sys.modules, "mmpeft.memory", raising=False)
    with pytest.warns(DeprecationWarning):
        memory = importlib.import_module("mmpeft.memory")
    from mmpeft.core.process_memory import ProcessPeak
    from mmpeft.lab.records import process_environment

    assert memory.ProcessPeak is ProcessPeak and memory.process_environment is process_environment


def test_the_version_has_one_source():
    from mmpeft.core import state
    from mmpeft.version import __version__

    assert mmpeft.__version__ == __version__ == state._version() == importlib.metadata.version("mmpeft")


def test_python_m_mmpeft_quickstart_is_still_an_entry_without_a_warning():
    command = [sys.executable, "-W", "error::DeprecationWarning", "-m", "mmpeft.quickstart", "--help"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=False)
    assert done.returncode == 0, done.stderr
    assert "--shots" in done.stdout and "--task" in done.stdout
