"""Toy token backbones that exercise the anatomy's corners, plus the inputs they take.

- `ToyTextTower`: a causal text tower pooled at the EOT token (the highest token id, as CLIP does).
- `ToyPointTower`: positions re-added before every block, bias-free qkv, a BatchNorm embedding.
- `ToyRegViT`: a ViT with LayerScale and register tokens, positions on patches only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import DropPath, LayerScale
from torch import nn

from mmpeft.core.anatomy import Attention, ForwardContext, TokenBackbone, TokenBlock


class ToyMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = (
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def toy_block(dim: int, heads: int, qkv_bias: bool = True, layer_scale: float | None = None, drop: float = 0.1):
    attn = Attention(nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim), heads, attn_drop=drop)
    ls = (lambda: LayerScale(dim, layer_scale)) if layer_scale else (lambda: None)
    return TokenBlock(
        nn.LayerNorm(dim),
        attn,
        nn.LayerNorm(dim),
        ToyMlp(dim, 2 * dim, drop),
        ls(),
        ls(),
        DropPath(drop),
        DropPath(drop),
    )


class ToyTextTower(TokenBackbone):
    name = "toy_text"

    def __init__(self, vocab: int = 50, length: int = 8, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.vocab, self.length, self.embed_dim, self.num_heads, self.pool_type = vocab, length, dim, heads, "eot"
        self.token_embedding = nn.Embedding(vocab, dim)
        self.positional_embedding = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(toy_block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_sites()

    def embed(self, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ctx.causal = True
        ctx.pool_index = ids.argmax(dim=-1)
        ctx.layout["tokens"] = slice(0, ids.shape[1])
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    def example_inputs(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        ids = torch.randint(1, self.vocab - 1, (batch, self.length), generator=generator)
        eot = torch.randint(2, self.length, (batch,), generator=generator)
        ids[torch.arange(batch), eot] = self.vocab - 1
        return ids


class ToyPointTower(TokenBackbone):
    name = "toy_point"
    pos_every_block = True

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, points: int = 16):
        super().__init__()
        self.embed_dim, self.num_heads, self.pool_type, self.points = dim, heads, "cls+max", points
        self.point_embed = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, dim))
        self.pos_mlp = nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(toy_block(dim, heads, qkv_bias=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_sites()

    def embed(self, xyz: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, n, _ = xyz.shape
        tokens = self.point_embed[1](self.point_embed[0](xyz).transpose(1, 2)).transpose(1, 2)
        tokens = self.point_embed[3](self.point_embed[2](tokens))
        pos = self.pos_mlp(xyz)
        ctx.positions = torch.cat([pos.new_zeros(b, 1, pos.shape[-1]), pos], dim=1)
        ctx.layout.update(cls=slice(0, 1), patches=slice(1, n + 1))
        return torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)

    def example_inputs(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch, self.points, 3, generator=generator)


class ToyRegViT(TokenBackbone):
    name = "toy_reg_vit"

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, img: int = 16, patch: int = 4, regs: int = 2):
        super().__init__()
        self.embed_dim, self.num_heads, self.pool_type, self.img, self.regs = dim, heads, "cls", img, regs
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, regs, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(toy_block(dim, heads, layer_scale=0.5) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_sites()

    def embed(self, images: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        b, n = x.shape[:2]
        ctx.layout.update(
            cls=slice(0, 1), registers=slice(1, 1 + self.regs), patches=slice(1 + self.regs, 1 + self.regs + n)
        )
        return torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), x], dim=1)

    def example_inputs(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch, 3, self.img, self.img, generator=generator)


class ToyDigitsBN(TokenBackbone):
    """8x8 single-channel images, a BatchNorm in the patch embedding, dropout in the blocks."""

    name = "toy_digits_bn"

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed_dim, self.num_heads, self.pool_type = dim, heads, "cls"
        self.patch_embed = nn.Sequential(nn.Conv2d(1, dim, 2, 2), nn.BatchNorm2d(dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(toy_block(dim, heads, drop=0.2) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_sites()

    def embed(self, images: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        ctx.layout.update(cls=slice(0, 1), patches=slice(1, 1 + x.shape[1]))
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


def write_ramp_images(root: Path, counts: dict[str, int]) -> Path:
    """64x64 ramp images with `<split>.txt` lists as the image-list data module reads them (`counts`: split ->
    images, labels alternating 0 / 1, so a DiT with two classes takes them too); returns `root`."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    ramp = torch.linspace(0, 1, 64)
    for split, count in counts.items():
        lines = []
        for i in range(count):
            rgb = torch.stack([ramp.view(1, -1).expand(64, 64), ramp.view(-1, 1).expand(64, 64),
                               torch.full((64, 64), 0.1 * i)], -1)  # fmt: skip
            Image.fromarray((rgb * 255).byte().numpy()).save(root / "img" / f"{split}_{i}.png")
            lines.append(f"img/{split}_{i}.png {i % 2}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
