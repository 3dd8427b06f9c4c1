"""`ContentCache`: per-sample outputs of a frozen module, keyed by the sample's content, computed once.

The one cache mechanism of mmpeft: the latent-diffusion task keeps the VAE posterior of each image and the
text states of each prompt in one, and the classification task the frozen backbone's pooled features of each
image (the cached linear probe). A key is a hash of a tensor sample's bytes, shape and dtype (a string, e.g.
a prompt, is its own key; callers with a sample identity pass their own keys), so a cached value is only
ever reused for exactly the input it was computed from: correct whatever the data, as long as the module is
deterministic for that input (frozen, in eval mode) — that is the caller's condition to check.

Growth is bounded: entries stop being added once `max_bytes` are held (one warning; later samples are
computed each time). A caller that walks its data in passes (epochs) can ask the cache to check that the
inputs repeat (`start_pass`, `check_repeats`): when too few of the second pass's samples were cached by the
first (random augmentation makes new inputs every epoch), the cache warns once, empties itself and turns
itself off, instead of growing by a dataset's worth of useless entries every epoch.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["ContentCache", "content_key", "content_keys", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB per cache
Value = torch.Tensor | tuple[torch.Tensor, ...]


def _digest(prefix: str, data: Any) -> str:
    digest = hashlib.sha1(prefix.encode())
    digest.update(data)
    return digest.hexdigest()


def content_key(sample: Any) -> Hashable:
    """The key of one sample: a tensor's hash (its bytes, shape and dtype); a string or number is its own key."""
    if not isinstance(sample, torch.Tensor):
        return sample
    return content_keys(sample.unsqueeze(0))[0]


def content_keys(batch: torch.Tensor | Sequence[Any]) -> list[Hashable]:
    """The key of every sample of a batch (a tensor's rows, or a list's items). A tensor on an accelerator is
    copied to the CPU once for the whole batch."""
    if not isinstance(batch, torch.Tensor):
        return [content_key(s) for s in batch]
    rows = batch.detach().to("cpu").contiguous()
    prefix = f"{rows.dtype}{tuple(rows.shape[1:])}"
    flat = rows.reshape(len(rows), -1).view(torch.uint8).numpy()  # bytes of any dtype, bfloat16 included
    return [_digest(prefix, memoryview(flat[i])) for i in range(len(flat))]


def _nbytes(value: Value) -> int:
    return sum(t.numel() * t.element_size() for t in ((value,) if isinstance(value, torch.Tensor) else value))


def _store(value: Value, device: torch.device | None) -> Value:
    """Detached copies (a row of a batch would otherwise keep the whole batch's storage alive)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device or value.device, copy=True)
    return tuple(_store(v, device) for v in value)


def _row(value: Value, i: int) -> Value:
    return value[i] if isinstance(value, torch.Tensor) else tuple(v[i] for v in value)


def _stack(values: list[Value], device: torch.device | None) -> Value:
    if isinstance(values[0], torch.Tensor):
        return torch.stack([v if device is None else v.to(device) for v in values])  # type: ignore[union-attr]
    return tuple(_stack([v[k] for v in values], device) for k in range(len(values[0])))  # type: ignore[index]


def _take(samples: torch.Tensor | Sequence[Any], index: list[int]) -> Any:
    if isinstance(samples, torch.Tensor):
        return samples[index]
    return [samples[i] for i in index]


class ContentCache:
    """Per-sample values (a tensor, or a tuple of tensors) of a deterministic function, keyed by content.

    Args:
        name: what is cached, for messages ("latents", "backbone features").
        max_bytes: stop adding entries once this many bytes are held (None: no bound).
        device: where values are kept ("cpu" to spare accelerator memory); None keeps them where they were
            computed. Values come back on the device of the inputs' computation either way.
        min_repeats: `check_repeats` turns the cache off when the fraction of the second pass's samples
            found in it is below this.

    `cache.get_or_compute(samples, compute)` is the usual entry point; `len`, `in`, `[key]` and `clear`
    behave as on a dict.
    """

    def __init__(
        self,
        name: str,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        device: str | torch.device | None = None,
        min_repeats: float = 0.5,
    ):
        self.name, self.max_bytes, self.min_repeats = name, max_bytes, min_repeats
        self.device = torch.device(device) if device is not None else None
        self.enabled = True
        self.nbytes = 0
        self.full = False
        self.passes = 0
        self.hits = self.lookups = 0  # over the current pass
        self._repeats_checked = False
        self._entries: dict[Hashable, Value] = {}

    # -- a dict's view ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __getitem__(self, key: Hashable) -> Value:
        return self._entries[key]

    def keys(self):
        return self._entries.keys()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes, self.full = 0, False

    def put(self, key: Hashable, value: Value) -> bool:
        """Store a detached copy; False (and one warning) once the byte budget is spent."""
        if not self.enabled or key in self._entries:
            return key in self._entries
        size = _nbytes(value)
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            if not self.full:
                warnings.warn(
                    f"the {self.name} cache is full ({len(self)} entries, {self.nbytes / 2**20:.1f} MiB of at most "
                    f"{self.max_bytes / 2**20:.1f} MiB): samples beyond these are computed every time (raise the "
                    "cache's byte budget to cache them all)",
                    stacklevel=3,
                )
            self.full = True
            return False
        self._entries[key] = _store(value, self.device)
        self.nbytes += size
        return True

    # -- the entry point ------------------------------------------------------------------------------------
    def get_or_compute(
        self,
        samples: torch.Tensor | Sequence[Any],
        compute: Callable[[Any], Value],
        keys: Sequence[Hashable] | None = None,
    ) -> Value:
        """The values of a batch of samples, batched like `compute`'s output: cached rows come from the cache,
        the others from `compute` and are stored.

        Samples not cached are computed one at a time (`compute` on a batch of one), so a value depends on its
        input alone, never on which samples shared its batch (backends' kernels may round differently per batch
        size): a resumed run, whose cache starts empty and fills in another order, reads exactly the values the
        uninterrupted run read. `keys`: one per sample (default: `content_keys(samples)`). Turned off, it is
        just `compute(samples)`.
        """
        if not self.enabled:
            return compute(samples)
        keys = content_keys(samples) if keys is None else list(keys)
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.lookups += len(keys)
        computed: dict[int, Value] = {}
        for i in missing:
            value = _row(compute(_take(samples, [i])), 0)
            computed[i] = value
            self.put(keys[i], value)
        device = _device(next(iter(computed.values()))) if computed else None
        if device is None and self.device is not None:
            device = _device(samples)
        return _stack([computed[i] if i in computed else self._entries[k] for i, k in enumerate(keys)], device)

    # -- do the inputs repeat? ---------------------------------------------------------------------------------
    def start_pass(self) -> None:
        """A new pass over the data (an epoch) starts; a pass that ended early is judged here."""
        if self.passes == 2 and not self._repeats_checked and self.lookups:
            self.check_repeats(final=True)
        self.passes += 1
        self.hits = self.lookups = 0

    def check_repeats(self, min_lookups: int = 32, expected: float = 1.0, final: bool = False) -> bool:
        """During the second pass, once `min_lookups` samples were looked up (or at its end, `final`): turn the
        cache off, with one warning, when fewer than `min_repeats * expected` of them were cached by the first
        pass (`expected`: the fraction that should have been, e.g. 1 / world size under DDP, where each rank
        sees another shard each epoch). True while the cache stays on."""
        if not self.enabled or self._repeats_checked or self.passes != 2 or (self.lookups < min_lookups and not final):
            return self.enabled
        self._repeats_checked = True
        rate = self.hits / max(self.lookups, 1)
        if rate < self.min_repeats * expected:
            budget = (
                f"; the cache was also full ({self.nbytes / 2**20:.1f} MiB), raise its byte budget if the data is "
                "deterministic"
                if self.full
                else ""
            )
            self.disable(
                f"only {rate:.0%} of the second epoch's {self.lookups} inputs repeat an input of the first: the "
                f"transform is random (augmentation), so the {self.name} cache is turned off and its {len(self)} "
                f"entries dropped{budget}"
            )
        return self.enabled

    def disable(self, reason: str) -> None:
        """Empty the cache and compute everything from now on, with one warning."""
        if self.enabled:
            warnings.warn(reason, stacklevel=3)
        self.enabled = False
        self.clear()


def _device(value: Any) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0].device
    return None
