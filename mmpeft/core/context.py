"""The forward context: what every attached piece may read during one forward, on every backbone.

A backbone creates one `ForwardContext` per forward from a `BackboneInput` (the tensor plus the
conditioning a task fills in: timestep, text or class conditioning, the sampler's step, point
coordinates) and makes it *current* in its own `ContextSlot` while the forward runs. Pieces attached
by name (a LoRA on `to_q`, a scale after `conv2`) read `self.context`; pieces on token-anatomy sites
also get it as an argument.

The slot belongs to one backbone (two models in one process never see each other's context), and
`checkpoint_in_context` re-installs the context a block ran with when activation checkpointing
recomputes it in backward — also when two forwards ran before one backward (MoSA's two passes, a
teacher and a student).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["BackboneInput", "ForwardContext", "ContextSlot", "checkpoint_in_context", "as_input"]


@dataclass
class BackboneInput:
    """A backbone's structured input, filled by the task.

    `x`: the main tensor (images, noisy latents, token ids, points). `timestep`: the [B] tensor a
    denoiser receives. `cond`: its conditioning (text-encoder states for a UNet, class labels for a
    DiT). `step`: the index into the sampler's schedule, set by samplers and distillation loops
    (None when training with random timesteps). `xyz`: point coordinates. `kwargs`: anything else the
    wrapped model takes (e.g. `added_cond_kwargs`), passed through untouched.
    """

    x: Any
    timestep: torch.Tensor | None = None
    cond: Any = None
    step: int | None = None
    xyz: torch.Tensor | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> BackboneInput:
        """A copy with every tensor (conditioning and kwargs included) on `device`."""
        move = lambda v: v.to(device) if torch.is_tensor(v) else v
        return BackboneInput(
            move(self.x), move(self.timestep), move(self.cond), self.step, move(self.xyz),
            {k: move(v) for k, v in self.kwargs.items()},
        )  # fmt: skip


def as_input(inputs: Any) -> BackboneInput:
    """A plain tensor (or a mapping with the same keys) as a `BackboneInput`."""
    if isinstance(inputs, BackboneInput):
        return inputs
    if isinstance(inputs, dict):
        names = {f.name for f in fields(BackboneInput)}
        unknown = set(inputs) - names
        if unknown or "x" not in inputs:
            raise KeyError(f"a backbone input mapping has keys {sorted(names)} ('x' required); got {sorted(inputs)}")
        return BackboneInput(**inputs)
    return BackboneInput(x=inputs)


@dataclass
class ForwardContext:
    """What methods need during one forward and no method owns.

    Every backbone fills `timestep`, `cond`, `step` (and `xyz` for points) from its input. Token
    backbones also keep `layout` (token groups as slices of the sequence), the attention mask,
    per-block `positions`, the pooling index and `token_meta` (per-token tensors such as point
    centres); a backbone whose positions are read off another model's position table under virtual
    views (Any2Point) also fills `view_coords`, where each token lands in that table per view, which
    methods pool by (Any2Point's guided adapter). Anything that inserts or removes tokens goes through
    `insert` / `remove`, which keep all of them consistent. `draws` stores per-forward random choices so a
    checkpointed recompute is the identical forward.
    """

    layout: dict[str, slice] = field(default_factory=dict)
    causal: bool = False
    attn_mask: torch.Tensor | None = None  # explicit [L, L] or [B, 1, L, L]; bool (True = attend) or additive
    positions: torch.Tensor | None = None  # [B, L, D], added before every block where the backbone does so
    pool_index: torch.Tensor | None = None  # [B] token index pooled by "eot"
    token_meta: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, L, ...] per-token tensors
    # [B, L, V, d]: each token's coordinates in the source's position space under V virtual views (d = 2: pixel
    # column and row of a 2-D source's image; d = 1: a 1-D source's position index); zeros for tokens without one
    view_coords: torch.Tensor | None = None
    centres: torch.Tensor | None = None
    timestep: torch.Tensor | None = None
    cond: Any = None
    step: int | None = None
    xyz: torch.Tensor | None = None
    training: bool = False
    prompt_index: int = 0  # where inserted prompts go (set by the backbone after embedding)
    draws: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None

    @classmethod
    def for_input(cls, inputs: BackboneInput, training: bool) -> ForwardContext:
        """The context of one forward. In training the draw generator is seeded here, before any block
        runs: seeding it lazily inside a checkpointed block would shift the global RNG between the
        forward and its recompute, and dropout there would differ."""
        ctx = cls(training=training, timestep=inputs.timestep, cond=inputs.cond, step=inputs.step, xyz=inputs.xyz)
        if training:
            ctx.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return ctx

    def draw(self, key: str, sample: Callable[[torch.Generator], Any]) -> Any:
        """A random choice made once per forward (and reused when checkpointing recomputes it)."""
        if key not in self.draws:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self.draws[key] = sample(self.generator)
        return self.draws[key]

    def snapshot(self) -> ForwardContext:
        """A shallow copy: token state as it is now, the same draws (they are shared)."""
        return copy.copy(self)

    # -- token groups ---------------------------------------------------------------------------------
    def span(self, name: str) -> slice:
        if name not in self.layout:
            raise KeyError(f"no token group {name!r} in this forward; groups: {list(self.layout)}")
        return self.layout[name]

    def tokens(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x[:, self.span(name)]

    def insert(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        name: str,
        at: int,
        meta: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Insert `tokens` [B, n, D] at sequence index `at` as group `name`; returns the new x.

        Per-token tensors (positions, view coordinates, `token_meta`) get rows for the new tokens: `meta[key]` if
        given, zeros otherwise.
        """
        n = tokens.shape[1]
        if name in self.layout:
            raise ValueError(f"token group {name!r} already exists; use replace()")
        self.layout = {
            k: (s if s.stop <= at else slice(s.start + (n if s.start >= at else 0), s.stop + n))
            for k, s in self.layout.items()
        }
        self.layout[name] = slice(at, at + n)
        self.layout = dict(sorted(self.layout.items(), key=lambda kv: kv[1].start))
        meta = meta or {}
        if self.positions is not None:
            self.positions = _insert_rows(self.positions, at, n, meta.get("positions"))
        if self.view_coords is not None:
            self.view_coords = _insert_rows(self.view_coords, at, n, meta.get("view_coords"))
        self.token_meta = {k: _insert_rows(v, at, n, meta.get(k)) for k, v in self.token_meta.items()}
        if self.attn_mask is not None:  # the causal part is the `causal` flag, so SDPA keeps its fast path
            self.attn_mask = _insert_mask(self.attn_mask, at, n)
        if self.pool_index is not None:
            self.pool_index = torch.where(self.pool_index >= at, self.pool_index + n, self.pool_index)
        if self.prompt_index > at:
            self.prompt_index += n
        return torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at:]], dim=1)

    def replace(self, x: torch.Tensor, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """Overwrite group `name` with `tokens` (e.g. VPT-deep's fresh prompts before each block)."""
        s = self.span(name)
        return torch.cat([x[:, : s.start], tokens.to(x.dtype), x[:, s.stop :]], dim=1)

    def remove(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Drop group `name` (e.g. prompts after block L); every per-token record shrinks with it."""
        s = self.span(name)
        n = s.stop - s.start
        if self.pool_index is not None and bool(((self.pool_index >= s.start) & (self.pool_index < s.stop)).any()):
            raise ValueError(f"cannot remove token group {name!r}: the pooled token is inside it")
        self.layout = {
            k: (v if v.stop <= s.start else slice(v.start - n, v.stop - n)) for k, v in self.layout.items() if k != name
        }
        if self.positions is not None:
            self.positions = _drop_rows(self.positions, s)
        if self.view_coords is not None:
            self.view_coords = _drop_rows(self.view_coords, s)
        self.token_meta = {k: _drop_rows(v, s) for k, v in self.token_meta.items()}
        if self.attn_mask is not None:
            keep = [i for i in range(self.attn_mask.shape[-1]) if not s.start <= i < s.stop]
            index = torch.tensor(keep, device=self.attn_mask.device)
            self.attn_mask = self.attn_mask.index_select(-1, index).index_select(-2, index)
        if self.pool_index is not None:
            self.pool_index = torch.where(self.pool_index >= s.stop, self.pool_index - n, self.pool_index)
        if self.prompt_index >= s.stop:
            self.prompt_index -= n
        return torch.cat([x[:, : s.start], x[:, s.stop :]], dim=1)


def _insert_rows(t: torch.Tensor, at: int, n: int, rows: torch.Tensor | None) -> torch.Tensor:
    if rows is None:
        rows = t.new_zeros((t.shape[0], n, *t.shape[2:]))
    return torch.cat([t[:, :at], rows.to(t.dtype), t[:, at:]], dim=1)


def _drop_rows(t: torch.Tensor, s: slice) -> torch.Tensor:
    return torch.cat([t[:, : s.start], t[:, s.stop :]], dim=1)


def _insert_mask(mask: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Inserted tokens attend to, and are seen by, everything the explicit mask allows at `at`."""
    allow = True if mask.dtype == torch.bool else 0.0
    rows = mask.new_full(mask.shape[:-2] + (n, mask.shape[-1]), allow)
    mask = torch.cat([mask[..., :at, :], rows, mask[..., at:, :]], dim=-2)
    cols = mask.new_full(mask.shape[:-1] + (n,), allow)
    return torch.cat([mask[..., :at], cols, mask[..., at:]], dim=-1)


class ContextSlot:
    """The context of the forward in flight on one backbone (a stack: nested forwards restore theirs).

    Attached pieces hold a reference to their backbone's slot, never a global: two models in one
    process keep separate slots, and a deep copy of a model gets a fresh slot of its own. The stack is
    per thread, so replicas run by `nn.DataParallel` threads do not see each other's forwards (a
    checkpoint recompute on autograd's own thread re-installs its context there).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _stack(self) -> list[ForwardContext]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @property
    def current(self) -> ForwardContext | None:
        stack = self._stack()
        return stack[-1] if stack else None

    @contextlib.contextmanager
    def active(self, ctx: ForwardContext) -> Iterator[ForwardContext]:
        stack = self._stack()
        stack.append(ctx)
        try:
            yield ctx
        finally:
            stack.pop()

    def __deepcopy__(self, memo: dict) -> ContextSlot:
        return ContextSlot()

    def __getstate__(self) -> dict:
        return {"fresh": True}  # a forward in flight is never pickled (and a falsy state would skip __setstate__)

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


def _default_checkpoint(fn: Callable, *args: Any) -> Any:
    return checkpoint(fn, *args, use_reentrant=False)


def checkpoint_in_context(
    slot: ContextSlot,
    ctx: ForwardContext,
    fn: Callable,
    *args: Any,
    checkpoint_fn: Callable | None = None,
) -> Any:
    """`checkpoint_fn(fn, *args)` with `ctx` current in `slot` in the forward *and* in the recompute.

    The recompute sees a snapshot of the context as the block first saw it (also where `ctx` is one
    of `args`), so tokens inserted or removed by later blocks do not leak into it; the draws are
    shared, so random choices repeat.
    """
    snapshot = ctx.snapshot()
    calls = 0

    def run(*inner: Any) -> Any:
        nonlocal calls
        use = ctx if calls == 0 else snapshot.snapshot()
        calls += 1
        with slot.active(use):  # a block that takes the context as an argument gets the same one
            return fn(*(use if a is ctx else a for a in inner))

    return (checkpoint_fn or _default_checkpoint)(run, *args)
