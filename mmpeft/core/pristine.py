"""The pristine frozen backbone, on demand and without a second copy of its weights.

Most methods only add modules, so switching those off gives back the frozen backbone. Some train
backbone tensors in place (BitFit's biases, LayerNorm tuning, DiffFit's norms and class table, and under
every method the tensors the task owns, such as a DiT's fresh class table: `Method.trained_in_place`):
when the method is applied, `record_originals` keeps a copy of *only those* tensors (KBs), and
`disabled()` swaps them in for the duration of the context. Merged deltas are not silently taken
out: `disabled()` on a merged model refuses and says to unmerge first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.modules import adapter_modules

__all__ = ["InPlaceOriginals", "record_originals", "originals_of", "restore_originals", "disabled", "ORIGINALS"]

ORIGINALS = "mmpeft_originals"  # child module name on the backbone


class InPlaceOriginals(nn.Module):
    """The step-0 values of the backbone tensors a method trains in place, as non-persistent buffers
    (they follow `.to()` but never enter a state dict or an adapter file)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(tensors)
        for i, value in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", value.detach().clone(), persistent=False)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(self.names):
            yield name, getattr(self, f"t{i}")


def record_originals(backbone: nn.Module, names: Iterable[str]) -> None:
    """Keep the step-0 values of the parameters `names`, and of the buffers of every layer whose parameters are all
    among them (the running statistics of a BatchNorm that trains whole, e.g. in Any2Point's tokenizer)."""
    names = sorted(set(names))
    if not names:
        return
    params = dict(backbone.named_parameters())
    kept = {n: params[n] for n in names}
    trained = set(names)
    for prefix, module in backbone.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if own and all(n in trained for n in own):
            for n, buffer in module.named_buffers(recurse=False):
                if buffer is not None and n not in module._non_persistent_buffers_set:
                    kept[f"{prefix}.{n}" if prefix else n] = buffer
    backbone.add_module(ORIGINALS, InPlaceOriginals(kept))


def originals_of(backbone: nn.Module) -> InPlaceOriginals | None:
    return getattr(backbone, ORIGINALS, None)


def _holders(backbone: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter, tied parameters included."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in backbone.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, attr))
    return holders


@contextlib.contextmanager
def _originals_swapped_in(backbone: nn.Module) -> Iterator[None]:
    store = originals_of(backbone)
    if store is None:
        yield
        return
    params = dict(backbone.named_parameters())
    holders = _holders(backbone)
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for name, original in store.items():
            if name not in params:  # a buffer of a layer that trains whole: swapped in place of the running one
                owner, _, attr = name.rpartition(".")
                module = backbone.get_submodule(owner) if owner else backbone
                swapped.append((module._buffers, attr, module._buffers[attr]))
                module._buffers[attr] = original.clone()  # a forward in train mode may update it: not the record
                continue
            trained = params[name]
            stand_in = nn.Parameter(original, requires_grad=False)
            for module, attr in holders[id(trained)]:
                swapped.append((module._parameters, attr, module._parameters[attr]))
                module._parameters[attr] = stand_in
        yield
    finally:
        for table, attr, trained in reversed(swapped):
            table[attr] = trained


@torch.no_grad()
def restore_originals(backbone: nn.Module) -> None:
    """Write the recorded step-0 values back into the in-place-trained tensors (used by `unload`)."""
    store = originals_of(backbone)
    if store is None:
        return
    tensors = {**dict(backbone.named_buffers()), **dict(backbone.named_parameters())}
    for name, original in store.items():
        tensors[name].copy_(original)


@contextlib.contextmanager
def disabled(backbone: nn.Module) -> Iterator[nn.Module]:
    """Run `backbone` as the pristine frozen backbone: every method piece off, in-place-trained tensors
    at their step-0 values, every layer in eval mode (dropout and drop-path off). Everything is put
    back on exit. Refused for full fine-tuning (no frozen backbone is kept) and on a merged model.
    """
    method = getattr(backbone, "_mmpeft_method", None)
    if method is not None and getattr(method, "trains_backbone", False):
        raise NotSupported(
            f"method {method.name!r} trains every backbone tensor in place, so there is no frozen backbone to switch "
            "back to; keep a copy of the backbone (copy.deepcopy before training) if you need the original"
        )
    gone = getattr(method, "no_pristine", None)  # a method whose model keeps no frozen weights at all
    if gone:
        raise NotSupported(gone)
    pieces = [m for _, m in adapter_modules(backbone)]
    merged = [type(m).__name__ for m in pieces if m.merged]
    if merged:
        raise NotSupported(
            f"the method is merged into the backbone ({merged[0]}), so disabled() cannot give the frozen backbone; "
            "call unmerge() first"
        )
    enabled = [m.enabled for m in pieces]
    training = [(m, m.training) for m in backbone.modules()]
    for m in pieces:
        m.enabled = False
    backbone.eval()
    try:
        with _originals_swapped_in(backbone):
            yield backbone
    finally:
        for m, flag in zip(pieces, enabled):
            m.enabled = flag
        for m, flag in training:
            m.training = flag
