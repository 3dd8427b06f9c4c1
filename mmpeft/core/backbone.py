"""`Backbone`: the base of every backbone mmpeft builds, token or not.

A backbone turns a `BackboneInput` into one `ForwardContext` per forward and keeps it current in its
own `ContextSlot` while it runs, so every attached piece can read the timestep, the conditioning and
the sampler's step. It also says how to make an example batch and its loss, which is all that
`mmpeft params`, `mmpeft bench` and the conformance suite need to know about a model family
(classification: images and cross-entropy; denoisers: noisy latents, timesteps, conditioning and
the noise-prediction MSE).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from mmpeft.core.context import BackboneInput, ContextSlot, ForwardContext, as_input

__all__ = ["Backbone", "register_foreign_backbone", "as_backbone"]

# class name of a foreign model (matched along its MRO) -> "module:factory" that wraps it as a Backbone.
# Strings, so the core imports no backbone package and no heavy library until such a model shows up.
FOREIGN_BACKBONES: dict[str, str] = {}


class Backbone(nn.Module):
    """Base class. Subclasses implement `forward_in_context(inputs, ctx)` (and, for classification
    backbones, `example_inputs`); denoisers override `example_batch` and `example_loss`.

    Class attributes: `name` (what adapter files record), `family` (picks each method's default
    targets: "token", "unet", "dit", "timm", ...), `num_features` (pooled feature width; 0 for
    models without pooled features, which then get no task head), `token_anatomy` (why token
    methods cannot run here, for their error messages).
    """

    name: str = "backbone"
    family: str = "generic"
    num_features: int = 0
    token_anatomy: str = "not a token backbone"

    def __init__(self) -> None:
        super().__init__()
        self.context_slot = ContextSlot()

    # -- the forward -------------------------------------------------------------------------------------
    def new_context(self, inputs: BackboneInput) -> ForwardContext:
        return ForwardContext.for_input(inputs, self.training)

    def forward(self, inputs: Any) -> torch.Tensor:
        inputs = as_input(inputs)
        ctx = self.new_context(inputs)
        with self.context_slot.active(ctx):
            return self.forward_in_context(inputs, ctx)

    def forward_in_context(self, inputs: BackboneInput, ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    @property
    def context(self) -> ForwardContext | None:
        """The context of the forward in flight (None outside a forward)."""
        return self.context_slot.current

    def task_owned(self) -> list[str]:
        """Names of backbone tensors that belong to the task rather than to the pretrained model (a DiT's fresh
        class table for a new dataset): like a task head, they train under every method, count as trainable and
        go in the adapter file (`Method.declared_trainable` adds them). None by default."""
        return []

    def disabled(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The pristine frozen backbone, without a second copy (see `mmpeft.core.pristine.disabled`)."""
        from mmpeft.core.pristine import disabled  # pristine imports the method core

        return disabled(self)

    # -- what params / bench / the conformance suite need ------------------------------------------------
    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> Any:
        """Inputs of the right shape and type for one forward (images, token ids, points, ...)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to make example inputs")

    def example_batch(
        self, batch: int, generator: torch.Generator | None = None, num_classes: int | None = None
    ) -> tuple[Any, Any]:
        """(inputs, targets) of one training step; classification by default (labels in [0, num_classes))."""
        inputs = self.example_inputs(batch, generator)
        if not num_classes:
            raise ValueError(f"{type(self).__name__} is a classification backbone: example_batch needs num_classes")
        return inputs, torch.randint(0, num_classes, (batch,), generator=generator)

    def example_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The training loss of `outputs` (the model's output, head included) against the targets."""
        return F.cross_entropy(outputs, targets.to(outputs.device))

    def input_layer(self) -> str:
        """The first layer on the input side (the bench floor's one trainable vector goes after it)."""
        for name, module in self.named_modules():
            if isinstance(module, _ConvNd | nn.Linear | nn.Embedding):
                return name
        raise ValueError(f"{type(self).__name__} has no convolution, linear or embedding layer")


def register_foreign_backbone(class_name: str, factory: str) -> None:
    """Wrap models of class `class_name` (or a subclass) with `factory` ("package.module:Callable")
    when they are handed to `PeftModel` directly, e.g. a diffusers `UNet2DConditionModel`."""
    FOREIGN_BACKBONES[class_name] = factory


def as_backbone(module: nn.Module) -> nn.Module:
    """`module` itself if it is a Backbone or nothing is registered for it, else its registered wrapper."""
    if isinstance(module, Backbone):
        return module
    for cls in type(module).__mro__:
        factory = FOREIGN_BACKBONES.get(cls.__name__)
        if factory:
            import importlib

            path, _, attr = factory.partition(":")
            return getattr(importlib.import_module(path), attr)(model=module)
    return module
