"""Where a training step's memory goes: the tensors autograd saves for backward, by module and method piece.

Peak training memory above the frozen forward is mostly what autograd keeps for backward. This runs one
training step under `torch.autograd.graph.saved_tensors_hooks` and charges every saved tensor to the module
whose forward was running when it was saved (the innermost one), counting each storage once: a tensor
saved twice (by two ops, or by two modules) is charged where it was first saved and its other saves are
counted as `resaved`, so "saved twice" shows up instead of inflating the total. Parameters that autograd
keeps (a linear's weight, for its input gradient) are not activation memory and are left out.
`mmpeft bench --memory` prints the table per method; `rows_by_pattern` folds block indices (`blocks.3.` ->
`blocks.*.`) so a 12-block model gives one row per position.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmpeft.core.modules import adapter_modules

__all__ = [
    "SavedTensors",
    "saved_tensors",
    "rows_by_pattern",
    "breakdown_markdown",
    "ProcessPeak",
    "process_environment",
]


@dataclass
class SavedTensors:
    """Bytes of saved storages per module (each storage once), how often a storage was saved again, and which
    module names belong to method pieces."""

    bytes_by_module: dict[str, int] = field(default_factory=dict)
    resaved_by_module: dict[str, int] = field(default_factory=dict)
    pieces: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_module.values())

    def piece_bytes(self) -> int:
        return sum(b for name, b in self.bytes_by_module.items() if self.is_piece(name))

    def is_piece(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.pieces)


def saved_tensors(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                  forward: Callable[[nn.Module, Any], Any] | None = None) -> SavedTensors:  # fmt: skip
    """Run one forward + backward of `model` and attribute every tensor saved for backward."""
    names = {module: name or "(model)" for name, module in model.named_modules()}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    seen: set[int] = set()
    result = SavedTensors()
    result.pieces = {f"backbone.{prefix}" for prefix, _ in adapter_modules(getattr(model, "backbone", model))}
    by_module: dict[str, int] = defaultdict(int)
    resaved: dict[str, int] = defaultdict(int)

    def enter(module: nn.Module, *_: Any) -> None:
        stack.append(names.get(module, type(module).__name__))

    def leave(module: nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in parameters or pointer == 0:
            return tensor
        owner = stack[-1] if stack else "(outside any module)"
        if pointer in seen:
            resaved[owner] += 1
        else:
            seen.add(pointer)
            by_module[owner] += storage.nbytes()
        return tensor

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = forward(model, inputs) if forward else model(inputs)
            loss = loss_fn(outputs, targets)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    result.bytes_by_module, result.resaved_by_module = dict(by_module), dict(resaved)
    return result


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def rows_by_pattern(saved: SavedTensors) -> list[dict[str, Any]]:
    """One row per module pattern (block indices folded), largest first: MiB saved, share of the total,
    storages saved again, and whether the module is a method piece."""
    grouped: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name in set(saved.bytes_by_module) | set(saved.resaved_by_module):
        row = grouped[_pattern(name)]
        row[0] += saved.bytes_by_module.get(name, 0)
        row[1] += saved.resaved_by_module.get(name, 0)
        row[2] = row[2] or int(saved.is_piece(name))
    total = saved.total or 1
    rows = [
        {
            "module": pattern,
            "MiB": round(b / 2**20, 2),
            "share": round(b / total, 3),
            "resaved": r,
            "piece": bool(p),
        }  # fmt: skip
        for pattern, (b, r, p) in grouped.items()
    ]
    return sorted(rows, key=lambda row: (-row["MiB"], row["module"]))


def breakdown_markdown(method: str, saved: SavedTensors, top: int = 15) -> str:
    """A markdown table of the largest rows, with the totals (all saved storages, method pieces, resaves)."""
    rows = rows_by_pattern(saved)
    lines = [
        f"### {method}: {saved.total / 2**20:.1f} MiB saved for backward ({saved.piece_bytes() / 2**20:.1f} MiB by "
        f"method pieces; {sum(saved.resaved_by_module.values())} storages saved more than once)",
        "",
        "| module | MiB | share | saved again | method piece |",
        "|---|---|---|---|---|",
    ]
    for row in rows[:top]:
        piece = "yes" if row["piece"] else ""
        lines.append(f"| {row['module']} | {row['MiB']:.2f} | {row['share']:.1%} | {row['resaved']} | {piece} |")
    if len(rows) > top:
        rest = sum(r["MiB"] for r in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | {rest:.2f} | | | |")
    return "\n".join(lines) + "\n"


class _SampledRss:
    """The fallback where /proc is missing: the resident set sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        import psutil  # noqa: PLC0415 - a dependency of wandb and lightning

        return psutil.Process(os.getpid()).memory_info().rss

    def start(self) -> None:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self.peak, self.rss())


class ProcessPeak:
    """This process's peak memory above a baseline taken at `start()`: CUDA's allocator peak on a GPU; on Linux
    the kernel's own high-water mark of the resident set (VmHWM), reset at `start()` by writing 5 to
    /proc/self/clear_refs, so the peak is exact (no sampling) and belongs to what runs after `start()`.
    Elsewhere (no /proc, or not writable) it samples the RSS from a thread; `kind` says which was used.
    `start(keep_baseline=True)` opens a new peak window against the first baseline (per-epoch peaks of one
    run, `tasks.callbacks.RunStats`)."""

    def __init__(self, device: torch.device, sample_interval: float = 0.005):
        self.device, self.baseline, self.kind = device, 0, ""
        self._sampler: _SampledRss | None = None
        self.sample_interval = sample_interval

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{field} not in /proc/self/status")

    def start(self, keep_baseline: bool = False) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if not keep_baseline:
                self.baseline = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_peak"
            return
        if self._sampler is None:
            try:
                current = self._status("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.baseline = self.baseline if keep_baseline else current
                self.kind = "vmhwm"
                return
            except OSError:
                self._sampler, self.kind = _SampledRss(self.sample_interval), "sampled_rss"
        self._sampler.start()
        if not keep_baseline:
            self.baseline = self._sampler.peak

    def stop(self) -> int:
        """Bytes of the peak above the baseline."""
        if self.kind == "cuda_peak":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self._sampler is not None:
            return max(self._sampler.stop() - self.baseline, 0)
        return max(self._status("VmHWM") - self.baseline, 0)


def process_environment() -> dict[str, str]:
    """What a benchmark number depends on: versions, threads, CPU / GPU model."""
    import platform  # noqa: PLC0415

    import mmpeft  # noqa: PLC0415

    env = {"python": platform.python_version(), "torch": torch.__version__, "mmpeft": mmpeft.__version__,
           "threads": str(torch.get_num_threads())}  # fmt: skip
    for package in ("timm", "peft", "diffusers"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor() or "unknown"
    env["cpus"] = str(os.cpu_count())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
