"""Optimizer parameter groups and the warmup + cosine schedule shared by every task."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mmpeft.core.method import Method

__all__ = ["param_groups", "warmup_cosine", "build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, method: Method, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: decayed, and exempt as the method says (1-D, prompts)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if method.weight_decay_exempt(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: list[dict], name: str, lr: float, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier: 0 at step 0, linear to 1 at the end of warmup, cosine to `min_ratio` at the end.

    Starting from 0 follows VPT's WarmupCosineSchedule (spec vision.md §6 item 10).
    """
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
