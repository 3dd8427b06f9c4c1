"""open_clip's image and text towers in the token anatomy.

Each `ResidualAttentionBlock` becomes a `TokenBlock`: the fused `nn.MultiheadAttention` turns into
the anatomy's `attn.qkv` / `attn.proj` linears (weights shared, rows q, k, v as in `in_proj_weight`),
`ln_1`/`ln_2` into `norm1`/`norm2`, `mlp.c_fc`/`mlp.c_proj` into `mlp.fc1`/`mlp.fc2`, and the final
LayerNorm into `norm`, so every method targets the same names as on a timm ViT. `open_clip_state_dict`
and `load_open_clip_state_dict` translate to and from open_clip's own keys, so a converted tower
loads the original checkpoint and a merged one saves one. The text tower keeps its causal mask and
pools at the EOT token through the forward context, so inserted prompts extend the mask and shift
the pooling index. ModifiedResNet image towers and HF text towers raise `NotSupported`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft.backbones.registry import register_backbone_prefix
from mmpeft.backbones.weights import from_hub, optional_path, weights_source
from mmpeft.core.anatomy import Attention, ForwardContext, TokenBackbone, TokenBlock
from mmpeft.core.errors import NotSupported, UnknownName
from mmpeft.core.identity import record_weights
from mmpeft.core.method import list_methods
from mmpeft.core.modules import adapter_modules

__all__ = ["ClipImageTower", "ClipTextTower", "FeedForward", "create_open_clip"]

# (our key, open_clip's key) for the block parts whose names differ; {i} is the block index
_BLOCK_KEYS = (
    ("blocks.{i}.norm1.", "transformer.resblocks.{i}.ln_1."),
    ("blocks.{i}.norm2.", "transformer.resblocks.{i}.ln_2."),
    ("blocks.{i}.attn.qkv.weight", "transformer.resblocks.{i}.attn.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", "transformer.resblocks.{i}.attn.in_proj_bias"),
    ("blocks.{i}.attn.proj.", "transformer.resblocks.{i}.attn.out_proj."),
    ("blocks.{i}.mlp.fc1.", "transformer.resblocks.{i}.mlp.c_fc."),
    ("blocks.{i}.mlp.fc2.", "transformer.resblocks.{i}.mlp.c_proj."),
    ("blocks.{i}.ls1.", "transformer.resblocks.{i}.ls_1."),
    ("blocks.{i}.ls2.", "transformer.resblocks.{i}.ls_2."),
)


def _rename(key: str, pairs, reverse: bool = False) -> str:
    """Translate one key through (ours, theirs) templates, in either direction."""
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        new = re.sub(pattern, dst.replace("{i}", r"\1"), key)
        if new != key:
            return new
    return key


class FeedForward(nn.Module):
    """fc1 -> activation -> fc2 with the anatomy's names (open_clip's c_fc / gelu / c_proj)."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _register_configs() -> None:
    """mmpeft's own open_clip configs (e.g. `mmpeft-tiny-clip`, for smoke runs and tests)."""
    import open_clip

    folder = Path(__file__).parent / "open_clip_configs"
    if "mmpeft-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(folder)


def create_open_clip(
    name: str, weights: str | None = None, pretrained: str | None = None, device: str | None = None
) -> nn.Module:
    """An open_clip model from random init, a local checkpoint file, or a hub tag (clear error offline)."""
    import open_clip

    weights = optional_path(weights)
    _register_configs()
    if name not in open_clip.list_models():
        raise NotSupported(f"open_clip has no model {name!r}; see open_clip.list_models()")
    if weights and pretrained:
        raise ValueError("pass either weights=FILE or pretrained=TAG (hub), not both")
    if pretrained:
        return from_hub(
            f"{name}/{pretrained}", lambda: open_clip.create_model(name, pretrained=pretrained, device=device or "cpu")
        )
    return open_clip.create_model(name, pretrained=weights, device=device or "cpu")  # "meta": counts for free


def _convert_block(block: nn.Module) -> TokenBlock:
    from open_clip.transformer import ResidualAttentionBlock

    mha = getattr(block, "attn", None)
    if type(block) is not ResidualAttentionBlock or not isinstance(mha, nn.MultiheadAttention):
        raise NotSupported(f"open_clip block {type(block).__name__} (qk-norm / scaled attention) is not supported")
    if not mha.batch_first:
        raise NotSupported("sequence-first open_clip blocks (open_clip < 2.26) are not supported")
    width = mha.embed_dim
    qkv = nn.Linear(width, 3 * width, bias=mha.in_proj_bias is not None, device=mha.in_proj_weight.device)
    qkv.weight = mha.in_proj_weight
    if mha.in_proj_bias is not None:
        qkv.bias = mha.in_proj_bias
    proj = nn.Linear(width, width, bias=mha.out_proj.bias is not None, device=mha.out_proj.weight.device)
    proj.weight, proj.bias = mha.out_proj.weight, mha.out_proj.bias
    attn = Attention(qkv, proj, mha.num_heads, attn_drop=mha.dropout)
    mlp = FeedForward(block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj)
    return TokenBlock(block.ln_1, attn, block.ln_2, mlp, block.ls_1, block.ls_2)


class _ClipTower(TokenBackbone):
    """Shared key translation; subclasses set `_prefix` (open_clip's path to the tower)."""

    _renames: tuple[tuple[str, str], ...] = ()

    def _record_weights(self, weights: str | None, pretrained: str | None, name: str, given: bool) -> None:
        """The frozen weights' identity (see `mmpeft.core.identity`); a model handed in is fingerprinted later,
        when a PeftModel is built on it (its source is not known here)."""
        if not given:
            record_weights(self, weights_source(weights, pretrained, f"open_clip:{name}"))

    def _own_state(self) -> dict[str, torch.Tensor]:
        added = [p for p, _ in adapter_modules(self)]
        return {k: v for k, v in self.state_dict().items() if not any(k.startswith(p + ".") for p in added)}

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen tower under open_clip's keys (relative to the tower, as `model.visual.state_dict()`)."""
        return {_rename(k, (*_BLOCK_KEYS, *self._renames)): v for k, v in self._own_state().items()}

    def load_open_clip_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict in open_clip's keys (strict on the tower's own tensors)."""
        ours = {_rename(k, (*_BLOCK_KEYS, *self._renames), reverse=True): v for k, v in state.items()}
        own = self._own_state()
        missing, unexpected = sorted(own.keys() - ours.keys()), sorted(ours.keys() - own.keys())
        if missing or unexpected:
            raise KeyError(f"open_clip state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(ours, strict=False)


def _check_text_tower(model: nn.Module) -> None:
    if not hasattr(model, "token_embedding"):
        raise NotSupported(
            f"{type(model).__name__} has a Hugging Face text tower (CustomTextCLIP), which the token anatomy does "
            f"not cover; name-targeted methods ({', '.join(list_methods(needs_tokens=False))}) work on it directly"
        )


class ClipImageTower(_ClipTower):
    """open_clip's ViT image tower; features are the projected CLS token (CLIP's image embedding).

    Args:
        name: open_clip model name ("ViT-B-32", "ViT-B-16-quickgelu", ...).
        weights: a local open_clip checkpoint file; pretrained: a hub tag (fails fast offline).
        model: an already built open_clip model to convert instead (its modules are shared).
        device: build on this device ("meta" makes full-size parameter counts free).
    """

    _renames = (("norm.", "ln_post."),)

    def __init__(self, name: str = "ViT-B-32", weights: str | None = None, pretrained: str | None = None,
                 model: Any = None, device: str | None = None):  # fmt: skip
        super().__init__()
        from open_clip.transformer import VisionTransformer

        model_given = model is not None
        model = model if model_given else create_open_clip(name, weights, pretrained, device)
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise NotSupported(
                f"open_clip image tower {type(visual).__name__} is not a ViT; token methods need one. Name-targeted "
                f"methods work on it directly: {', '.join(list_methods(needs_tokens=False))}"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise NotSupported("open_clip image towers with attention pooling or other pool types are not supported")
        self.name = f"open_clip:{name}:image"
        self.conv1, self.class_embedding, self.positional_embedding = visual.conv1, visual.class_embedding, \
            visual.positional_embedding  # fmt: skip
        self.patch_dropout, self.ln_pre, self.norm, self.proj = visual.patch_dropout, visual.ln_pre, visual.ln_post, \
            visual.proj  # fmt: skip
        self.blocks = nn.ModuleList(_convert_block(b) for b in visual.transformer.resblocks)
        self.embed_dim = visual.conv1.out_channels
        self.num_heads = self.blocks[0].attn.num_heads
        self.pool_type = "cls"
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        self.init_sites()
        self._record_weights(weights, pretrained, name, given=model_given)

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, self.conv1.in_channels, *self.image_size, generator=generator)

    @property
    def num_features(self) -> int:
        return self.proj.shape[1] if self.proj is not None else self.embed_dim

    def prompt_fan_in(self) -> int | None:
        return int(self.conv1.weight[0].numel())

    def embed(self, images: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        ctx.layout.update(cls=slice(0, 1), patches=slice(1, x.shape[1]))
        return self.ln_pre(self.patch_dropout(x))

    def pool(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        pooled = super().pool(x, ctx)
        return pooled @ self.proj if self.proj is not None else pooled


class ClipTextTower(_ClipTower):
    """open_clip's text tower: causal, pooled at the EOT token (the highest id), projected."""

    _renames = (("norm.", "ln_final."),)

    def __init__(self, name: str = "ViT-B-32", weights: str | None = None, pretrained: str | None = None,
                 model: Any = None, device: str | None = None):  # fmt: skip
        super().__init__()
        model_given = model is not None
        model = model if model_given else create_open_clip(name, weights, pretrained, device)
        _check_text_tower(model)
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise NotSupported(f"text pooling {model.text_pool_type!r} is not supported (only EOT/argmax)")
        if isinstance(model.text_projection, nn.Linear):
            raise NotSupported("a Linear text projection is not supported; open_clip's default is a matrix")
        self.name = f"open_clip:{name}:text"
        self.token_embedding, self.positional_embedding = model.token_embedding, model.positional_embedding
        self.blocks = nn.ModuleList(_convert_block(b) for b in model.transformer.resblocks)
        self.norm, self.text_projection = model.ln_final, model.text_projection
        self.embed_dim = model.token_embedding.embedding_dim
        self.num_heads = self.blocks[0].attn.num_heads
        self.pool_type = "eot"
        self.init_sites()
        self._record_weights(weights, pretrained, name, given=model_given)

    @property
    def num_features(self) -> int:
        return self.text_projection.shape[1] if self.text_projection is not None else self.embed_dim

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids as open_clip's tokenizer lays them out: tokens, the EOT (the highest id), zero padding."""
        vocab, length = self.token_embedding.num_embeddings, self.positional_embedding.shape[0]
        ids = torch.randint(1, vocab - 1, (batch, length), generator=generator)
        eot = torch.randint(2, length, (batch,), generator=generator)
        for row, pos in enumerate(eot.tolist()):
            ids[row, pos] = vocab - 1
            ids[row, pos + 1 :] = 0
        return ids

    def embed(self, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ctx.causal = True
        ctx.pool_index = ids.argmax(dim=-1)
        ctx.layout["tokens"] = slice(0, ids.shape[1])
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    def pool(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        pooled = super().pool(x, ctx)
        return pooled @ self.text_projection if self.text_projection is not None else pooled


@register_backbone_prefix("open_clip", usage="open_clip:<model>:image|text", family=_ClipTower.family)
def open_clip_tower(rest: str, **kwargs: Any) -> _ClipTower:
    """an open_clip model's image or text tower ("open_clip:ViT-B-32:image")"""
    model, tower = (rest.split(":") + [""])[:2]
    if tower not in ("image", "text"):
        raise UnknownName(
            f"open_clip backbones are named 'open_clip:<model>:image' or ':text', got {'open_clip:' + rest!r}"
        )
    kwargs.pop("img_size", None)
    return (ClipImageTower if tower == "image" else ClipTextTower)(model, **kwargs)
