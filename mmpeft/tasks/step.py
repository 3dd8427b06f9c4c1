"""One training step, shared by the Lightning tasks, `mmpeft bench`, the quickstart pretraining and the
conformance helpers: the method's forward passes (MoSA runs two), the task loss on the first output,
and the method's extra loss (MoSA's consistency term). Lightning does the backward and the optimizer
step for the tasks; `optimizer_step` / `fit_steps` do them for the plain loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mmpeft.core.model import PeftModel

__all__ = ["StepResult", "step_loss", "optimizer_step", "fit_steps"]

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor  # task loss + the method's extra loss
    task_loss: torch.Tensor
    extra_loss: torch.Tensor | None
    outputs: list[torch.Tensor]  # one per forward pass


def step_loss(model: PeftModel, inputs: Any, targets: Any, loss_fn: LossFn) -> StepResult:
    """The loss of one training step (no backward): the task loss plus the method's `extra_loss`."""
    outputs = [model(inputs) for _ in range(model.method.forward_passes)]
    task_loss = loss_fn(outputs[0], targets)
    extra = model.method.extra_loss(outputs)
    return StepResult(task_loss + extra if extra is not None else task_loss, task_loss, extra, outputs)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def fit_steps(
    model: PeftModel,
    batches: Iterable[tuple[Any, Any]],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    scheduler: Any = None,
) -> list[float]:
    """A plain training loop over `(inputs, targets)` batches (train mode); returns the step losses."""
    model.train()
    losses = []
    for inputs, targets in batches:
        result = step_loss(model, inputs, targets, loss_fn)
        optimizer_step(result.loss, optimizer, scheduler)
        losses.append(float(result.loss.detach()))
    return losses
