"""Checks the CLI makes before a run starts, so a run never does the wrong thing quietly: a checkpoint of
another run's method, a resume with changed options (which would not take effect), an evaluation of a head
nobody trained, a fit that would crash at its final test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmpeft.core.errors import AdapterMismatch, MmpeftError
from mmpeft.core.method import method_from_spec

__all__ = [
    "RunRefused",
    "check_checkpoint_fits",
    "check_resume_options",
    "refuse_untrained_evaluation",
    "require_test_split",
    "plain_config",
]

# Options a resumed fit may change: they do not change what is computed (where the data lives, how it is
# loaded — the per-item draws make workers irrelevant —, what is allowed to load) or are checked otherwise
# (the weights file: by the frozen weights' fingerprint the checkpoint records).
FREE_ON_RESUME = (
    "model.init_args.adapter",
    "model.init_args.allow_other_weights",
    "model.init_args.feature_cache_bytes",
    "model.init_args.backbone.init_args.weights",
    "data.init_args.root",
    "data.init_args.num_workers",
    "data.init_args.verify",
)
# Trainer options that change the result; the others (devices, logging, progress bars) do not.
TRAINER_RESULT_OPTIONS = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
EXTENDABLE = ("max_epochs", "max_steps")  # applied on resume: the schedule is recomputed for the new length


class RunRefused(MmpeftError, ValueError):
    """The requested run would give a wrong or useless answer; the message says what to pass instead."""


def _read_checkpoint(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_hparams(path: str) -> dict[str, Any]:
    return _read_checkpoint(path).get("hyper_parameters", {})


def plain_config(config: Any) -> dict[str, Any]:
    """A parsed config as plain JSON values (what checkpoints keep as `run_config`)."""
    config = config.as_dict() if hasattr(config, "as_dict") else config
    return json.loads(json.dumps(config, default=str))


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run config that decide what a resumed fit computes, flattened to dotted keys."""
    config = json.loads(json.dumps(config))
    init = (config.get("model") or {}).get("init_args") or {}
    for key in ("method", "text_method"):
        if init.get(key) is not None:
            init[key] = _method_config(init[key])
    trainer = config.get("trainer") or {}
    kept = {
        "seed_everything": config.get("seed_everything"),
        "model": config.get("model"),
        "data": config.get("data"),
        "trainer": {k: trainer.get(k) for k in TRAINER_RESULT_OPTIONS if k in trainer},
    }
    flat = _flat(kept, "")
    return {k: v for k, v in flat.items() if not k.startswith(FREE_ON_RESUME)}


def check_resume_options(config: Any, path: str) -> list[str]:
    """`fit --ckpt_path` continues the checkpoint's run exactly, so every option that decides what is computed
    must be the checkpoint's: a changed learning rate would be overwritten by the restored optimizer and
    schedule while the log showed the new one. Refuses a changed option, naming each; returns notes on the
    options applied on resume (a longer or shorter `max_epochs` / `max_steps`: the schedule is recomputed)."""
    saved = _read_checkpoint(path).get("run_config")
    if saved is None:  # written before run configs were kept: the method and head check is all there is
        return []
    ours, theirs = _comparable(plain_config(config)), _comparable(saved)
    differ = [k for k in dict.fromkeys([*theirs, *ours]) if k in theirs and k in ours and theirs[k] != ours[k]]
    if differ:
        detail = ", ".join(f"{k}={theirs[k]!r} in the checkpoint vs {ours[k]!r}" for k in differ[:6])
        raise RunRefused(
            f"resuming from {path!r} with changed options ({detail}): a resumed run restores the checkpoint's "
            "optimizer, schedule and RNG state, so a changed option would not take effect while the log showed it. "
            "Resume with the checkpoint's options (its run folder holds config.yaml), or start a new run from its "
            "adapter file with the new ones (--model.init_args.adapter <the adapter-*.safetensors beside it>)"
        )
    plain = plain_config(config)
    notes = []
    for key in EXTENDABLE:
        before, now = (saved.get("trainer") or {}).get(key), (plain.get("trainer") or {}).get(key)
        if before != now:
            notes.append(
                f"trainer.{key} {before} in the checkpoint -> {now}: applied; the learning-rate schedule is recomputed "
                f"for the new length from the checkpoint's step on"
            )
    return notes


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
