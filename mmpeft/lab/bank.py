"""`mmpeft bank -c CONFIG [fit options]`: build (or check) a method's derived state from its run's training data
without training: Point-PEFT's memory bank, the frozen pretrained encoder's features of the training split, with a
progress bar. The bank goes to the method's `bank` file, or the cache (where `mmpeft fit` with the same backbone and
data finds it).

    mmpeft bank -c configs/point/scanobjectnn/point_peft.yaml --data.init_args.root data/ScanObjectNN/h5_files
"""

from __future__ import annotations

import argparse

from mmpeft.core.errors import MmpeftError
from mmpeft.core.method import Method
from mmpeft.lab.run_configs import data_from_configs, task_from_configs

__all__ = ["add_bank_arguments", "bank_command"]


def add_bank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], required=True,
                   help="the run's config file(s), as for `fit`")  # fmt: skip
    p.set_defaults(takes_overrides=True)  # `fit`-style options after the configs, e.g. --data.init_args.root DIR


def bank_command(args: argparse.Namespace) -> int:
    task = task_from_configs(args.config, overrides=args.overrides)
    method = task.model.method
    if type(method).prepare is Method.prepare:
        raise MmpeftError(f"method {method.name!r} builds no derived state from the data (Point-PEFT does)")
    method.prepare(task.model.backbone, data_from_configs(args.config, args.overrides))
    print(f"memory bank: {method.bank} (sha256 {method.bank_sha256})")
    return 0
