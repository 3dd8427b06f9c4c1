"""Optimizer parameter groups and the warmup + cosine schedule shared by every task."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from mmpeft.core.method import Method

__all__ = [
    "param_groups",
    "describe_groups",
    "warmup_cosine",
    "warmup_linear",
    "timm_cosine",
    "build_optimizer",
    "OPTIMIZERS",
    "SCHEDULES",
]

SCHEDULES = ("warmup_cosine", "timm_cosine", "linear")

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, method: Method, weight_decay: float, lr: float | None = None) -> list[dict]:
    """The trainable parameters in optimizer groups: the method's own groups first (`Method.param_groups`:
    lr multipliers or absolute rates, their own weight decay), then the rest, decayed or exempt as the
    method says (1-D tensors and prompts by default). Each group is named; with `lr` given each gets
    its starting rate (schedules scale it)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prefix = "backbone." if hasattr(model, "backbone") else ""
    in_backbone = {n.removeprefix(prefix): p for n, p in named.items() if n.startswith(prefix)}
    groups, claimed = [], set()
    for spec in method.param_groups(in_backbone):
        names = [prefix + n for n in spec["params"]]
        unknown = [n for n in names if n not in named]
        if unknown or claimed & set(names):
            raise ValueError(f"method {method.name!r} group {spec.get('name')!r}: unknown or repeated {unknown[:3]}")
        claimed |= set(names)
        group = {"name": spec.get("name", f"{method.name}.{len(groups)}"), "params": [named[n] for n in names],
                 "weight_decay": spec.get("weight_decay", weight_decay)}  # fmt: skip
        if lr is not None:
            group["lr"] = spec["lr"] if "lr" in spec else lr * spec.get("lr_scale", 1.0)
        groups.append(group)
    decay, exempt = [], []
    for name, p in named.items():
        if name not in claimed:
            (exempt if method.weight_decay_exempt(name, p) else decay).append(p)
    for group_name, params, wd in (("decay", decay, weight_decay), ("no_decay", exempt, 0.0)):
        group = {"name": group_name, "params": params, "weight_decay": wd, **({"lr": lr} if lr is not None else {})}
        groups.append(group)
    return [g for g in groups if g["params"]]


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, tensors, parameters, lr, weight decay (for the run's log)."""
    lines = []
    for g in groups:
        size = sum(p.numel() for p in g["params"])
        lines.append(f"  {g.get('name', '?'):<12} {len(g['params']):>4} tensors {size:>12,} params  "
                     f"lr {g.get('lr', float('nan')):.3g}  weight decay {g.get('weight_decay', 0.0):.3g}")  # fmt: skip
    return "\n".join(lines)


def build_optimizer(
    groups: list[dict], name: str, lr: float, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _warmup_then(total_steps: int, warmup_steps: int, min_ratio: float,
                 decay: Callable[[float], float]) -> Callable[[int], float]:  # fmt: skip
    """lr multiplier: 0 at step 0, linear to 1 at the end of warmup, then `decay(progress)` (1 -> 0) scaled into
    [min_ratio, 1]."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * decay(progress)

    return factor


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier: 0 at step 0, linear to 1 at the end of warmup, cosine to `min_ratio` at the end.

    Starting from 0 follows VPT's WarmupCosineSchedule (KMnP/vpt src/solver/lr_scheduler.py).
    """
    return _warmup_then(total_steps, warmup_steps, min_ratio, lambda p: 0.5 * (1 + math.cos(math.pi * p)))


def warmup_linear(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier: linear from 0 to 1 over warmup, then linear to `min_ratio` at the end (transformers'
    `get_linear_schedule_with_warmup`, which EfficientDM's distillation uses with no warmup)."""
    return _warmup_then(total_steps, warmup_steps, min_ratio, lambda p: 1.0 - p)


def timm_cosine(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    warmup_epochs: int,
    cooldown_epochs: int,
    warmup_lr: float,
    min_lr: float,
) -> CosineLRScheduler:
    """timm's `CosineLRScheduler` as SSF's scripts create it (`--sched cosine`, `t_in_epochs`, no warmup prefix):
    linear from `warmup_lr` during warmup, then the cosine over the first `epochs - cooldown_epochs` epochs
    counted from epoch 0 (warmup included), then `min_lr` held through the cooldown epochs timm adds to the run
    (SSF: 100 + 10). Each group warms up to and decays from its own lr; `warmup_lr` and `min_lr` are absolute.
    Stepped per epoch by `PeftTask.lr_scheduler_step`."""
    t_initial = max(epochs - cooldown_epochs, 1)
    return CosineLRScheduler(
        optimizer, t_initial, lr_min=min_lr, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr, cycle_limit=1
    )
