"""The token anatomy: one owned block forward with named sites, shared by every transformer backbone.

mmpeft owns the block forward so every method attaches to the same named places whatever the
backbone (timm ViT, open_clip towers, point transformers). Frozen sub-modules keep their original
attribute names, so a converted model loads the original checkpoint.

    TokenBlock.forward(x, ctx):                    sites in brackets
        h = [attn.in]([norm1.out](norm1(x)))
        a = [attn.out](attn(h, ctx))               attn.qkv, attn.proj are plain linears
        a = [attn.branch](a, x_in=x)               after proj, before LayerScale
        x = x + drop_path1(ls1(a))
        h = [norm2.out](norm2(x))
        m = [mlp.out](mlp(h))                      mlp.fc1, mlp.fc2 are plain linears
        m = [mlp.branch](m, x_in=x)                parallel adapters see the block's residual
        x = x + drop_path2(ls2(m))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpeft.core.attention import attention
from mmpeft.core.modules import disabled

__all__ = ["SITES", "ForwardContext", "Site", "Attention", "TokenBlock", "TokenBackbone", "POOLS"]

SITES = ("norm1.out", "attn.in", "attn.out", "attn.branch", "norm2.out", "mlp.out", "mlp.branch")
POOLS = ("cls", "mean", "cls+max", "eot", "none")


@dataclass
class ForwardContext:
    """What methods need during one forward and no method owns.

    `layout` maps token groups (cls, registers, prompts, patches, tokens) to slices of the
    sequence; anything that inserts tokens goes through `insert`, which keeps the layout, the
    attention mask, per-block positions and the pooling index consistent. `draws` stores the
    per-forward random choices so activation checkpointing recomputes the identical forward.
    """

    layout: dict[str, slice] = field(default_factory=dict)
    causal: bool = False
    attn_mask: torch.Tensor | None = None  # explicit [L, L] or [B, 1, L, L]; bool (True = attend) or additive
    positions: torch.Tensor | None = None  # [B, L, D], added before every block where the backbone does so
    pool_index: torch.Tensor | None = None  # [B] token index pooled by "eot"
    centres: torch.Tensor | None = None
    neighbours: torch.Tensor | None = None
    pos_table: torch.Tensor | None = None
    grid: tuple[int, ...] | None = None
    cond: Any = None
    step: torch.Tensor | None = None
    training: bool = False
    prompt_index: int = 0  # where inserted prompts go (set by the backbone after embedding)
    draws: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def draw(self, key: str, sample: Callable[[torch.Generator], Any]) -> Any:
        """A random choice made once per forward (and reused when checkpointing recomputes it).

        The generator is seeded from torch's global RNG on first use, so `seed_everything` makes
        every draw reproducible.
        """
        if key not in self.draws:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self.draws[key] = sample(self.generator)
        return self.draws[key]

    def span(self, name: str) -> slice:
        if name not in self.layout:
            raise KeyError(f"no token group {name!r} in this forward; groups: {list(self.layout)}")
        return self.layout[name]

    def tokens(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x[:, self.span(name)]

    def insert(self, x: torch.Tensor, tokens: torch.Tensor, name: str, at: int) -> torch.Tensor:
        """Insert `tokens` [B, n, D] at sequence index `at` as group `name`; returns the new x."""
        n = tokens.shape[1]
        if name in self.layout:
            raise ValueError(f"token group {name!r} already exists; use replace()")
        self.layout = {
            k: (s if s.stop <= at else slice(s.start + (n if s.start >= at else 0), s.stop + n))
            for k, s in self.layout.items()
        }
        self.layout[name] = slice(at, at + n)
        self.layout = dict(sorted(self.layout.items(), key=lambda kv: kv[1].start))
        if self.positions is not None:
            zeros = self.positions.new_zeros(self.positions.shape[0], n, self.positions.shape[2])
            self.positions = torch.cat([self.positions[:, :at], zeros, self.positions[:, at:]], 1)
        if self.attn_mask is not None:  # the causal part is the `causal` flag, so SDPA keeps its fast path
            self.attn_mask = _insert_mask(self.attn_mask, at, n)
        if self.pool_index is not None:
            self.pool_index = torch.where(self.pool_index >= at, self.pool_index + n, self.pool_index)
        return torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at:]], dim=1)

    def replace(self, x: torch.Tensor, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """Overwrite group `name` with `tokens` (e.g. VPT-deep's fresh prompts before each block)."""
        s = self.span(name)
        return torch.cat([x[:, : s.start], tokens.to(x.dtype), x[:, s.stop :]], dim=1)


def _insert_mask(mask: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Inserted tokens attend to, and are seen by, everything the explicit mask allows at `at`."""
    allow = True if mask.dtype == torch.bool else 0.0
    rows = mask.new_full(mask.shape[:-2] + (n, mask.shape[-1]), allow)
    mask = torch.cat([mask[..., :at, :], rows, mask[..., at:, :]], dim=-2)
    cols = mask.new_full(mask.shape[:-1] + (n,), allow)
    return torch.cat([mask[..., :at], cols, mask[..., at:]], dim=-1)


class Site(nn.ModuleList):
    """A named place in the block forward; methods append hooks `h(x, ctx, **extra) -> x`."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext, **extra: torch.Tensor) -> torch.Tensor:
        for hook in self:
            if hook.enabled:
                x = hook(x, ctx, **extra)
        return x


class Attention(nn.Module):
    """Multi-head self-attention with fused `qkv` and `proj` linears (timm's names and layout)."""

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        norm: nn.Module | None = None,
        attn_drop: float = 0.0,
        proj_drop: nn.Module | None = None,
    ):
        super().__init__()
        if qkv.out_features % 3 or (qkv.out_features // 3) % num_heads:
            raise ValueError(f"qkv width {qkv.out_features} does not split into 3 x {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = qkv.out_features // 3 // num_heads
        self.qkv = qkv
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.attn_drop = attn_drop
        self.norm = norm or nn.Identity()
        self.proj = proj
        self.proj_drop = proj_drop or nn.Identity()
        self.backend = "auto"

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, mask=ctx.attn_mask, causal=ctx.causal, dropout_p=dropout, backend=self.backend)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(out))


class TokenBlock(nn.Module):
    """A pre-norm transformer block whose forward mmpeft owns (see the module docstring)."""

    def __init__(
        self,
        norm1: nn.Module,
        attn: Attention,
        norm2: nn.Module,
        mlp: nn.Module,
        ls1: nn.Module | None = None,
        ls2: nn.Module | None = None,
        drop_path1: nn.Module | None = None,
        drop_path2: nn.Module | None = None,
    ):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.ls1, self.ls2 = ls1 or nn.Identity(), ls2 or nn.Identity()
        self.drop_path1, self.drop_path2 = drop_path1 or nn.Identity(), drop_path2 or nn.Identity()
        self.sites = nn.ModuleDict({name.replace(".", "_"): Site() for name in SITES})

    def site(self, name: str) -> Site:
        if name not in SITES:
            raise KeyError(f"unknown site {name!r}; sites are {SITES}")
        return self.sites[name.replace(".", "_")]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        s = self.sites
        h = s.attn_in(s.norm1_out(self.norm1(x), ctx), ctx)
        a = s.attn_branch(s.attn_out(self.attn(h, ctx), ctx), ctx, x_in=x)
        x = x + self.drop_path1(self.ls1(a))
        h = s.norm2_out(self.norm2(x), ctx)
        m = s.mlp_branch(s.mlp_out(self.mlp(h), ctx), ctx, x_in=x)
        return x + self.drop_path2(self.ls2(m))


class TokenBackbone(nn.Module):
    """Base of every token backbone: embed -> (before_block, block) x depth -> final norm -> pool.

    Subclasses implement `embed(inputs, ctx)` (which fills `ctx.layout`, and for text towers the
    causal flag and `ctx.pool_index`) and set `blocks`, `norm`, `embed_dim`, `num_heads`,
    `pool_type`. `pos_every_block=True` adds `ctx.positions` before every block (point transformers).
    """

    name: str = "token_backbone"
    pos_every_block: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    # -- to be provided by subclasses -------------------------------------------------------
    def embed(self, inputs: Any, ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    def init_sites(self) -> None:
        """Call once `self.blocks` exists: one `before_block` site per block."""
        self.before_block = nn.ModuleList([Site() for _ in self.blocks])

    # -- the contract -----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_features(self) -> int:
        return self.embed_dim * (2 if self.pool_type == "cls+max" else 1)

    def new_context(self) -> ForwardContext:
        """In training the draw generator is seeded here, before any block runs: seeding it lazily
        inside a checkpointed block would shift the global RNG between the forward and its
        recompute, and dropout there would differ."""
        ctx = ForwardContext(training=self.training)
        if self.training:
            ctx.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return ctx

    def prompt_index(self, ctx: ForwardContext) -> int:
        """Where prompts are inserted: before the patches (after CLS and registers); for text
        towers, after the start token."""
        if "patches" in ctx.layout:
            return ctx.layout["patches"].start
        return ctx.layout["tokens"].start + 1 if "tokens" in ctx.layout else 0

    def prompt_fan_in(self) -> int | None:
        """fan-in of the input projection, for Xavier-initialised prompts (None: use the width)."""
        return None

    def final_norm(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.norm(x)

    def forward_tokens(self, inputs: Any, ctx: ForwardContext | None = None) -> tuple[torch.Tensor, ForwardContext]:
        ctx = ctx or self.new_context()
        x = self.embed(inputs, ctx)
        ctx.prompt_index = self.prompt_index(ctx)
        for i, block in enumerate(self.blocks):
            x = self.before_block[i](x, ctx, index=i) if len(self.before_block[i]) else x
            if self.pos_every_block and ctx.positions is not None:
                x = x + ctx.positions
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.final_norm(x, ctx), ctx

    def pool(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        kind = self.pool_type
        if kind == "cls":
            return x[:, ctx.span("cls")].squeeze(1)
        if kind == "eot":
            return x[torch.arange(x.shape[0], device=x.device), ctx.pool_index]
        if kind == "none":
            return x
        patches = ctx.tokens(x, "patches")
        if kind == "mean":
            return patches.mean(1)
        if kind == "cls+max":
            return torch.cat([x[:, ctx.span("cls")].squeeze(1), patches.max(1).values], dim=-1)
        raise ValueError(f"unknown pool type {kind!r}; choose one of {POOLS}")

    def forward_features(self, inputs: Any) -> torch.Tensor:
        x, ctx = self.forward_tokens(inputs)
        return self.pool(x, ctx)

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.forward_features(inputs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward; draws and RNG state make the recompute identical."""
        self.grad_checkpointing = enable

    def disabled(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The frozen backbone with every method switched off, without a second copy."""
        return disabled(self)

    def sites(self, name: str) -> Iterator[tuple[int, Site]]:
        for i, block in enumerate(self.blocks):
            yield i, block.site(name)
