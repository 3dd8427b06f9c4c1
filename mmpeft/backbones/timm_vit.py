"""timm Vision Transformers in the token anatomy, and any other timm model as a plain backbone.

`TimmViT` converts a timm `VisionTransformer` (plain, LayerScale, register tokens, e.g. DINOv2-
style) into a `TokenBackbone` by reusing its own sub-modules, so state-dict keys are timm's and the
original checkpoint loads. Other timm families (Swin, ConvNeXt, EVA/RoPE, parallel or post-norm
blocks) raise `NotSupported` naming the methods that do work there through `TimmModel`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from mmpeft.backbones.weights import from_hub, load_weights, optional_path, read_state_dict, weights_source
from mmpeft.core.anatomy import Attention, TokenBackbone, TokenBlock
from mmpeft.core.backbone import Backbone
from mmpeft.core.context import BackboneInput, ForwardContext
from mmpeft.core.errors import NotSupported
from mmpeft.core.identity import record_weights
from mmpeft.core.method import list_methods

__all__ = ["TimmViT", "TimmModel", "is_token_vit", "create_timm"]

_POOLS = {"token": "cls", "avg": "mean"}


def _timm():
    import timm  # keeps `import mmpeft` light

    return timm


def create_timm(
    name: str,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A headless timm model from random init, a local weights file, or the hub (`pretrained=True`)."""
    timm = _timm()
    if not timm.is_model(name):
        raise NotSupported(f"timm has no model {name!r}; see timm.list_models('{name.split('_', maxsplit=1)[0]}*')")
    weights = optional_path(weights)
    if weights is not None and pretrained:
        raise ValueError("pass either weights=FILE or pretrained=True (hub), not both")
    kwargs.setdefault("num_classes", 0)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if pretrained:
            model = from_hub(name, lambda: timm.create_model(name, pretrained=True, **kwargs))
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None:
        path = str(weights)
        if path.endswith(".npz"):
            model.load_pretrained(path)  # Google's JAX ViT checkpoints, through timm's own converter
        else:
            heads = ("head.", "fc.", "classifier.", "head_dist.")
            load_weights(model, read_state_dict(path), path, ignore=lambda k: k.startswith(heads))
    return model


def _timm_kwargs(img_size, drop_path_rate, timm_kwargs, kwargs) -> dict[str, Any]:
    merged = {**(timm_kwargs or {}), **kwargs}
    if img_size is not None:
        merged["img_size"] = img_size
    if drop_path_rate:
        merged["drop_path_rate"] = drop_path_rate
    return merged


def is_token_vit(model: nn.Module) -> str | None:
    """None if `model` fits the token anatomy, else the reason it does not."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer:
        return f"{type(model).__name__} is not a plain timm VisionTransformer"
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
        return f"global_pool={model.global_pool!r} (attention pooling) is not one of {sorted(_POOLS)}"
    if not isinstance(model.patch_drop, nn.Identity):
        return "patch dropout is not supported"
    for block in model.blocks:
        if type(block) is not Block:
            return f"block type {type(block).__name__} (parallel / post-norm / scaled blocks) is not supported"
        if type(block.attn) is not TimmAttention or getattr(block.attn, "gate", None) is not None:
            return f"attention type {type(block.attn).__name__} is not supported"
        if not isinstance(block.mlp, Mlp) or not hasattr(block.mlp, "fc1"):
            return f"MLP type {type(block.mlp).__name__} is not supported"
    return None


def _convert_block(block: nn.Module) -> TokenBlock:
    a = block.attn
    attn = Attention(
        a.qkv, a.proj, a.num_heads, q_norm=a.q_norm, k_norm=a.k_norm, norm=a.norm,
        attn_drop=a.attn_drop.p, proj_drop=a.proj_drop,
    )  # fmt: skip
    return TokenBlock(
        block.norm1, attn, block.norm2, block.mlp, block.ls1, block.ls2, block.drop_path1, block.drop_path2
    )


class TimmViT(TokenBackbone):
    """A timm ViT as a `TokenBackbone`; keys, outputs and defaults are timm's.

    Args:
        name: timm model name, e.g. "vit_base_patch16_224" or "vit_small_patch14_reg4_dinov2".
        weights: a local checkpoint (.safetensors, .pth/.bin, or Google's .npz); head keys are ignored.
        pretrained: fetch timm's pretrained weights from the hub (fails fast and clearly offline).
        device: build directly on this device ("meta" builds full-size models for free).
        img_size, drop_path_rate: the common `timm.create_model` options, named for YAML configs.
        dropout: dropout as the original ViT code has it (google-research/vision_transformer, and the
            ViT of KMnP/vpt and Theia-4869/MoSA `vit_backbones/vit.py`: `dropout_rate` 0.1 after the position
            embedding and inside the MLP, after the activation and after fc2; attention dropout 0):
            timm's `pos_drop_rate` and `proj_drop_rate`, with the attention projection's dropout off.
        timm_kwargs / **kwargs: any other `timm.create_model` options (e.g. {init_values: 1e-5}).
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        weights: str | None = None,
        pretrained: bool = False,
        device: str | None = None,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        timm_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        extra = _timm_kwargs(img_size, drop_path_rate, timm_kwargs, kwargs)
        if dropout:
            extra.update(pos_drop_rate=dropout, proj_drop_rate=dropout)
        model = create_timm(name, weights, pretrained, device, **extra)
        if dropout:  # the original ViT has no dropout after the attention projection
            for block in model.blocks:
                block.attn.proj_drop = nn.Identity()
        reason = is_token_vit(model)
        if reason:
            raise NotSupported(
                f"timm model {name!r} does not fit the token anatomy: {reason}. Methods that need it "
                f"({', '.join(list_methods(needs_tokens=True))}) cannot run on it; name-targeted methods work on any "
                f"timm model through mmpeft.backbones.TimmModel: {', '.join(list_methods(needs_tokens=False))}"
            )
        self.name = name
        self.embed_dim = model.embed_dim
        self.num_heads = model.blocks[0].attn.num_heads
        self.pool_type = _POOLS[model.global_pool]
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_reg_tokens = getattr(model, "num_reg_tokens", 0)
        self.no_embed_class = model.no_embed_class
        self.dynamic_img_size = getattr(model, "dynamic_img_size", False)
        self.has_class_token = model.cls_token is not None
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.reg_token = model.reg_token
        self.pos_embed = model.pos_embed
        self.pos_drop = model.pos_drop
        self.norm_pre = model.norm_pre
        self.blocks = nn.ModuleList(_convert_block(b) for b in model.blocks)
        self.norm = model.norm
        self.fc_norm = model.fc_norm
        self.init_sites()
        record_weights(self, weights_source(weights, pretrained, name))

    def embed(self, images: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.patch_embed(images)
        pos = self._pos_embed_for(x.shape[1:3]) if x.dim() == 4 else self.pos_embed
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if pos is not None and self.no_embed_class:
            x = x + pos
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        if pos is not None and not self.no_embed_class:
            x = x + pos
        c = int(self.has_class_token)
        if c:
            ctx.layout["cls"] = slice(0, 1)
        if self.num_reg_tokens:
            ctx.layout["registers"] = slice(c, c + self.num_reg_tokens)
        ctx.layout["patches"] = slice(self.num_prefix_tokens, x.shape[1])
        return self.norm_pre(self.pos_drop(x))

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """timm's dynamic-size path: resample the position table to this image's patch grid."""
        if self.pos_embed is None:
            return None
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=tuple(grid),
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        proj = getattr(self.patch_embed, "proj", None)
        channels = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
        return torch.randn(batch, channels, *self.patch_embed.img_size, generator=generator)

    def prompt_fan_in(self) -> int | None:
        weight = getattr(getattr(self.patch_embed, "proj", None), "weight", None)
        return int(weight[0].numel()) if weight is not None and weight.dim() == 4 else None

    def pool(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.fc_norm(super().pool(x, ctx))


class TimmModel(Backbone):
    """Any timm model as a headless backbone for the name-targeted methods (`list_methods(needs_tokens=False)`).

    The timm model lives in `self.model`, so its own state dict is `self.model.state_dict()`.
    """

    family = "timm"

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | None = None,
        pretrained: bool = False,
        device: str | None = None,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        timm_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        extra = _timm_kwargs(img_size, drop_path_rate, timm_kwargs, kwargs)
        try:
            self.model = create_timm(name, weights, pretrained, device, **extra)
        except TypeError as err:  # convnets take any input size and no img_size option: keep it as the input size
            if "img_size" not in str(err):
                raise
            self.model = create_timm(name, weights, pretrained, device, **{k: v for k, v in extra.items()
                                                                           if k != "img_size"})  # fmt: skip
        self.name = name
        self.num_features = self.model.num_features
        self.pretrained_cfg = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        self.token_anatomy = is_token_vit(self.model) or "fits the token anatomy; use TimmViT for token methods"
        default = tuple(self.pretrained_cfg.get("input_size", (3, 224, 224)))
        size = extra.get("img_size", default[1:])
        self.input_shape = (extra.get("in_chans", default[0]), *((size, size) if isinstance(size, int) else size))
        record_weights(self, weights_source(weights, pretrained, name))

    def forward_in_context(self, inputs: BackboneInput, ctx: ForwardContext) -> torch.Tensor:
        return self.model(inputs.x)

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=generator)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
