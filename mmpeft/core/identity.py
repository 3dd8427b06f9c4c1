"""Which frozen weights a backbone holds: a fingerprint of its tensors as loaded, and the weights file's name.

An adapter trains against one set of frozen weights; on the same architecture with other weights (a random
init, another checkpoint) it still loads — the shapes match — and gives wrong answers without a word. So
adapter files and training checkpoints record the identity of the frozen weights they were trained on, and
loading refuses a mismatch unless the user says it is meant (an adapter moved to a fine-tuned checkpoint).

The identity is taken when the weights are loaded, before any dtype cast (`record_weights`, called by every
mmpeft backbone at the end of its construction), and kept on the backbone, so a later `.to(bfloat16)` keeps
it. A module nobody recorded is fingerprinted when a `PeftModel` is built on it, before the method touches it.
Each tensor's hash is kept, so the fingerprint of the frozen part can leave out what a method trains in place
(BitFit's biases, DiffFit's norms): an adapter that holds those tensors does not depend on their start.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsIdentity", "record_weights", "weights_identity", "tensor_hash", "RANDOM_INIT"]

RANDOM_INIT = "random init"
_ATTRIBUTE = "_mmpeft_weights_identity"


def tensor_hash(tensor: torch.Tensor) -> str | None:
    """A short hash of a tensor's dtype, shape and bytes; None for tensors without data (the meta device)."""
    if tensor.is_meta:
        return None
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=8)
    if data.numel():
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsIdentity:
    """`source`: the weights file's name (or "random init", or what built the weights); `tensors`: each
    state-dict tensor's hash (None: not fingerprinted, e.g. built on the meta device)."""

    source: str
    tensors: dict[str, str | None] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return bool(self.tensors) and all(h is not None for h in self.tensors.values())

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM_INIT

    def fingerprint(self, exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        """One hash of the tensors not in `exclude` (the frozen part, when `exclude` is the trained set)."""
        if not self.known:
            return None
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(self.tensors):
            if name not in exclude:
                digest.update(f"{name}={self.tensors[name]};".encode())
        return digest.hexdigest()

    def record(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """What adapter files and checkpoints keep: the source and the fingerprint of the frozen tensors."""
        kept = [n for n in self.tensors if n not in exclude]
        return {"source": self.source, "fingerprint": self.fingerprint(exclude), "tensors": len(kept)}


def _source_name(source: str | os.PathLike | None) -> str:
    if source is None:
        return RANDOM_INIT
    text = str(source)
    return os.path.basename(text.rstrip("/\\")) or text


def record_weights(module: nn.Module, source: str | os.PathLike | None) -> WeightsIdentity:
    """Fingerprint `module`'s tensors as they are now (just loaded, or just initialised when `source` is None)
    and keep the identity on the module. `source`: the weights file or folder (its name is kept), or a
    description such as "hub:<name>"."""
    tensors = {name: tensor_hash(t) for name, t in module.state_dict().items()}
    identity = WeightsIdentity(_source_name(source), tensors)
    object.__setattr__(module, _ATTRIBUTE, identity)
    return identity


def weights_identity(module: nn.Module) -> WeightsIdentity:
    """The identity recorded on `module`, or, when none was, a fingerprint of its tensors now (source unknown)."""
    identity = getattr(module, _ATTRIBUTE, None)
    if identity is None:
        identity = record_weights(module, "as built (unrecorded)")
    return identity
