"""The cached linear probe: when nothing in the frozen backbone trains, its pooled features are a function of the
input, so each training / validation sample's features are computed once and only the head runs afterwards.

`FeatureCaches` owns the policy (when caching is valid, when it must switch itself off) and the caches; the task
asks it for the stage's runner and otherwise runs its step as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from mmpeft.core.cache import ContentCache
from mmpeft.core.modules import adapter_modules

PeftTask = pl.LightningModule  # a `mmpeft.tasks.base.PeftTask`, which imports this module (so no import back)

__all__ = ["FEATURE_CACHE_STAGES", "FeatureCaches", "feature_cache_refusal"]

FEATURE_CACHE_STAGES = ("train", "val")  # test and predict run once each: nothing to reuse


def feature_cache_refusal(task: PeftTask, own_forward: bool = False) -> str | None:
    """Why the backbone's features cannot be cached (None: they can): something in the backbone trains, a
    method piece is attached, or the task computes its output in a forward of its own (`own_forward`)."""
    name = task.method.name
    if own_forward:
        return f"{type(task).__name__} computes its output in a forward of its own"
    trained = [n for n, p in task.model.backbone.named_parameters() if p.requires_grad]
    if trained:
        return f"method {name!r} trains {len(trained)} backbone tensor(s) ({trained[0]}, ...)"
    pieces = [n for n, _ in adapter_modules(task.model.backbone)]
    if pieces:
        return f"method {name!r} attaches pieces to the backbone ({pieces[0] or 'the backbone'}, ...)"
    return None


class FeatureCaches:
    """The training and validation feature caches the `feature_cache` option asks for and the task allows
    (empty, and falsy, when caching is off)."""

    def __init__(self, task: PeftTask, spec: bool | str, max_bytes: int, own_forward: bool = False):
        if spec not in (True, False, "auto"):
            raise ValueError(f"feature_cache must be true, false or 'auto', got {spec!r}")
        why = feature_cache_refusal(task, own_forward) if spec else None
        if spec is True and why:
            raise ValueError(
                f"feature_cache=true caches the frozen backbone's features, which only a pure linear probe allows: "
                f"{why} (feature_cache: auto turns it on exactly when it is valid)"
            )
        stages = FEATURE_CACHE_STAGES if spec and not why else ()
        self.caches = {stage: ContentCache(f"{stage} backbone-feature", max_bytes) for stage in stages}
        self._mode_checked: int | None = None  # the epoch whose frozen modes were checked

    def __bool__(self) -> bool:
        return bool(self.caches)

    def __getitem__(self, stage: str) -> ContentCache:
        return self.caches[stage]

    def start_pass(self, stage: str) -> None:
        """A full pass over the stage's data begins (a training epoch, a validation run)."""
        if stage in self.caches:
            self.caches[stage].start_pass()

    def active(self, task: PeftTask, stage: str, inputs: Any) -> ContentCache | None:
        """The stage's cache when it is in use for these inputs; it switches itself off for good (saying why)
        when the inputs are no tensor, or when a frozen module runs in train mode (its features are random)."""
        cache = self.caches.get(stage)
        if cache is None or not cache.enabled:
            return None
        if not isinstance(inputs, torch.Tensor):
            cache.disable(f"feature cache off: the {stage} inputs are a {type(inputs).__name__}, not a tensor")
            return None
        if stage == "train" and self._mode_checked != task.current_epoch:  # once an epoch: the policy is fixed
            self._mode_checked = task.current_epoch
            backbone = task.model.backbone
            stochastic = next((n or "the backbone" for n, m in backbone.named_modules() if m.training), None)
            if stochastic is not None:
                cache.disable(
                    f"feature cache off: the frozen backbone runs {stochastic} in train mode (method "
                    f"{task.method.name!r} has frozen_mode {task.method.frozen_mode!r}), so its features are not "
                    "a function of the input"
                )
                return None
        return cache

    def features(self, task: PeftTask, cache: ContentCache, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's features of a batch: cached rows from the cache, the new inputs from one backbone
        forward (of the whole batch when every input is new, as in the first epoch)."""
        backbone = task.model.backbone

        def compute(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return backbone(batch)

        out = cache.get_or_compute(inputs, compute)
        world = task.trainer.world_size if task._trainer is not None else 1
        cache.check_repeats(expected=1.0 / max(world, 1))  # under DDP a rank sees another shard every epoch
        return out

    def runner(self, task: PeftTask, stage: str, inputs: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What computes the stage's output from these inputs when the cache serves them (the head on cached
        features, carrying the model's `method` for the step's extra loss), else None: run the task itself."""
        cache = self.active(task, stage, inputs)
        return None if cache is None else _HeadOnCachedFeatures(self, task, cache)


class _HeadOnCachedFeatures:
    """What `step_loss` runs for a cached probe: the head on the cached features; the model's method."""

    def __init__(self, caches: FeatureCaches, task: PeftTask, cache: ContentCache):
        self.caches, self.task, self.cache, self.method = caches, task, cache, task.model.method

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.task.model.head(self.caches.features(self.task, self.cache, inputs))
