"""This process's peak memory over a window: what the training callback reports per epoch and the bench per step.
Below the tasks and the lab, which both use it."""

from __future__ import annotations

import os
import threading
import time

import torch

__all__ = ["ProcessPeak"]


class _SampledRss:
    """The fallback where /proc is missing: the resident set sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        import psutil  # a dependency of wandb and lightning

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
