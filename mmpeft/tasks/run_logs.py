"""The CSV log of a resumed run: the same version folder, its earlier rows kept up to the checkpoint.

Lightning's `CSVLogger` deletes an existing `metrics.csv` when it opens a version folder again. A run resumed
from one of its own checkpoints continues that folder instead: the rows logged before the checkpoint's step
stay, the rows after it (written by the run before it was killed) go, since the resumed run, which is exact,
writes them again. (The `train/*_epoch` row of an epoch resumed mid-way averages only the batches after the
resume: Lightning does not checkpoint its epoch accumulators. Step rows and every later row are exact.)
"""

from __future__ import annotations

import csv
import os
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

__all__ = ["ContinuedCSVLogger"]

_RUN_VALUES = ("train/", "val/", "test/", "perf/")


def _kept(row: dict[str, str], until_step: int) -> bool:
    """A row written before the checkpoint (the checkpoint's own adapter-size row, logged at its step, too)."""
    step = int(float(row.get("step") or 0))
    if step < until_step:
        return True
    return step == until_step and not any(v not in ("", None) for k, v in row.items() if k.startswith(_RUN_VALUES))


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, until_step: int):
        self._until_step = until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the earlier rows (Lightning's writer deletes the file here)."""
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            keys, rows = list(reader.fieldnames or []), [r for r in reader if _kept(r, self._until_step)]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


class ContinuedCSVLogger(CSVLogger):
    """`CSVLogger` on an existing version folder whose run resumes from a checkpoint at global step `until_step`."""

    def __init__(self, *args: Any, until_step: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._until_step = until_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._until_step)
        return self._experiment
