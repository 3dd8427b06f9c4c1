"""The token anatomy: one owned block forward with named sites, shared by every transformer backbone.

mmpeft owns the block forward so every method attaches to the same named places whatever the
backbone (timm ViT, open_clip towers, point transformers). Frozen sub-modules keep their original
attribute names, so a converted model loads the original checkpoint.

    TokenBlock.forward(x, ctx):                    sites in brackets
        h = [attn.in]([norm1.out](norm1(x)))
        a = [attn.out](attn(h, ctx))               attn.qkv, attn.proj are plain linears
        a = [attn.branch](a, x_in=x)               after proj, before LayerScale
        y = [attn.parallel](x + b, x_in=x, branch=b)  b = drop_path1(ls1(a)); after the residual add
        h = [norm2.out](norm2(y))
        m = [mlp.out](mlp(h))                      mlp.fc1, mlp.fc2 are plain linears
        m = [mlp.branch](m, x_in=y)                inside LayerScale and drop-path
        z = [mlp.parallel](y + b, x_in=y, branch=b)   b = drop_path2(ls2(m)); after them (AdaptFormer's)
        return [block.out](z)

A parallel adapter on `mlp.parallel` returns `z + f(x_in)`: its output is not scaled by LayerScale
nor dropped by drop-path, as in AdaptFormer's official code; on `mlp.branch` it is. A parallel site also
passes `branch`, what the block adds to the stream there (after LayerScale and drop-path): a piece that reads the
branch as the residual adds it (Any2Point's adapter on the FFN output after LayerScale) needs no second copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmpeft.core.attention import attention
from mmpeft.core.backbone import Backbone
from mmpeft.core.context import BackboneInput, ForwardContext, as_input, checkpoint_in_context
from mmpeft.core.modules import call_piece

__all__ = ["SITES", "ForwardContext", "Site", "Attention", "TokenBlock", "TokenBackbone", "POOLS"]

SITES = (
    "norm1.out",
    "attn.in",
    "attn.out",
    "attn.branch",
    "attn.parallel",
    "norm2.out",
    "mlp.out",
    "mlp.branch",
    "mlp.parallel",
    "block.out",
)
POOLS = ("cls", "mean", "cls+max", "eot", "none")


class Site(nn.ModuleList):
    """A named place in the block forward; methods append hooks `h(x, ctx, **extra) -> x`."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext, **extra: Any) -> torch.Tensor:
        for hook in self:
            if hook.enabled and not hook.merged:
                x = call_piece(hook, x, ctx, **extra)
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

    def named_sites(self) -> Iterator[tuple[str, Site]]:
        for name in SITES:
            yield name, self.site(name)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        s = self.sites
        h = s.attn_in(s.norm1_out(self.norm1(x), ctx), ctx)
        a = s.attn_branch(s.attn_out(self.attn(h, ctx), ctx), ctx, x_in=x)
        b = self.drop_path1(self.ls1(a))
        y = s.attn_parallel(x + b, ctx, x_in=x, branch=b)
        h = s.norm2_out(self.norm2(y), ctx)
        m = s.mlp_branch(s.mlp_out(self.mlp(h), ctx), ctx, x_in=y)
        b = self.drop_path2(self.ls2(m))
        z = s.mlp_parallel(y + b, ctx, x_in=y, branch=b)
        return s.block_out(z, ctx)


class TokenBackbone(Backbone):
    """Base of every token backbone: embed -> (before_block, block) x depth -> final norm -> pool.

    Subclasses implement `embed(inputs, ctx)` (which fills `ctx.layout`, and for text towers the
    causal flag and `ctx.pool_index`) and set `blocks`, `norm`, `embed_dim`, `num_heads`,
    `pool_type`. `pos_every_block=True` adds `ctx.positions` before every block (point transformers).
    """

    name: str = "token_backbone"
    family: str = "token"
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

    def named_sites(self) -> Iterator[tuple[str, Site]]:
        for i, site in enumerate(self.before_block):
            yield f"before_block.{i}", site

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
        """Embed and run every block; returns the final-normed tokens and the context (for pooling)."""
        inputs = as_input(inputs)
        ctx = ctx or self.new_context(inputs)
        with self.context_slot.active(ctx):
            x = self.embed(inputs.x, ctx)
            ctx.prompt_index = self.prompt_index(ctx)
            for i, block in enumerate(self.blocks):
                x = self.before_block[i](x, ctx, index=i) if len(self.before_block[i]) else x
                if self.pos_every_block and ctx.positions is not None:
                    x = x + ctx.positions
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint_in_context(self.context_slot, ctx, block, x, ctx)
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

    def forward_in_context(self, inputs: BackboneInput, ctx: ForwardContext) -> torch.Tensor:
        x, ctx = self.forward_tokens(inputs, ctx)
        return self.pool(x, ctx)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward; draws and RNG state make the recompute identical."""
        self.grad_checkpointing = enable

    def sites(self, name: str) -> Iterator[tuple[int, Site]]:
        for i, block in enumerate(self.blocks):
            yield i, block.site(name)
