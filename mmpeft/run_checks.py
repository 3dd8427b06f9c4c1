"""Checks the CLI makes before a run starts, so a run never does the wrong thing quietly: a checkpoint of
another run's method, an evaluation of a head nobody trained, a fit that would crash at its final test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmpeft.core.errors import AdapterMismatch, MmpeftError
from mmpeft.core.method import method_from_spec

__all__ = ["RunRefused", "check_checkpoint_fits", "refuse_untrained_evaluation", "require_test_split"]


class RunRefused(MmpeftError, ValueError):
    """The requested run would give a wrong or useless answer; the message says what to pass instead."""


def _read_hparams(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("hyper_parameters", {})


def check_checkpoint_fits(model_config: Any, path: str) -> None:
    """`--ckpt_path` must come from a run with the requested config's task, method and head. Lightning would
    replace the config's model with the checkpoint's hyper-parameters (evaluating another run's method
    under this run's name); mmpeft keeps the config and refuses a checkpoint that does not fit it, as
    `--adapter` does. `model_config` is the parsed `model` entry (class_path + init_args)."""
    saved = _read_hparams(path)
    problems = []
    ours_class = str(model_config.get("class_path", "")).rsplit(".", 1)[-1]
    theirs_class = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    if ours_class and theirs_class and ours_class != theirs_class:
        problems.append(f"task {theirs_class} in the checkpoint vs {ours_class}")
    init = model_config.get("init_args", {}) or {}
    if "method" in saved:
        theirs, ours = _method_config(saved["method"]), _method_config(init.get("method", "linear"))
        keys = dict.fromkeys([*theirs, *ours])
        differ = [f"{k}={theirs.get(k)!r} in the checkpoint vs {ours.get(k)!r}" for k in keys
                  if theirs.get(k) != ours.get(k)]  # fmt: skip
        if differ:
            problems.append("method " + ", ".join(differ))
    if saved.get("head") != init.get("head"):
        problems.append(f"head {saved.get('head')!r} in the checkpoint vs {init.get('head')!r}")
    if problems:
        raise AdapterMismatch(
            f"checkpoint {path!r} does not fit this config: {'; '.join(problems)}; run with the config the "
            "checkpoint was trained with (its run directory holds config.yaml)"
        )


def _method_config(spec: Any) -> dict[str, Any]:
    spec = spec.as_dict() if hasattr(spec, "as_dict") else spec
    method = method_from_spec(spec)
    return json.loads(json.dumps({"name": method.name, **method.config()}))


def refuse_untrained_evaluation(task: Any, command: str) -> None:
    """Evaluating a head that was just initialised at random scores noise: ask for the trained weights.
    Heads built from something meaningful (CLIP's zero-shot head, a fine-tuned checkpoint's own head) and models
    without a head are fine."""
    if getattr(task.model, "head_config", None) is None or getattr(task.model, "head_source", None):
        return
    raise RunRefused(
        f"`mmpeft {command}` would evaluate a randomly initialised head: pass the trained weights with "
        "--adapter runs/<run>/version_N/adapter.safetensors or --ckpt_path <checkpoint>"
    )


def require_test_split(datamodule: Any) -> None:
    """`run.test_after_fit` needs a test split; find out before training, not after it."""
    if getattr(datamodule, "has_test_split", True):
        return
    raise RunRefused(
        f"{type(datamodule).__name__} has no test split under its current protocol (it selects on the "
        "validation split), but run.test_after_fit is true; use --data.init_args.protocol final or "
        "--run.test_after_fit false"
    )
