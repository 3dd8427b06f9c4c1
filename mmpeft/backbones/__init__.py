"""Frozen backbones. `create_backbone(name)` resolves mmpeft names first, then timm names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
from mmpeft.backbones.diffusion import TINY_DIT, TINY_SD_UNET, DiffusersDiT, DiffusersUNet
from mmpeft.backbones.digits import DigitsViT
from mmpeft.backbones.point import PointTransformer
from mmpeft.backbones.shapes import ShapesPointTransformer
from mmpeft.backbones.timm_vit import TimmModel, TimmViT, create_timm, is_token_vit
from mmpeft.core.errors import NotSupported, UnknownName

__all__ = [
    "ClipImageTower",
    "ClipTextTower",
    "DigitsViT",
    "PointTransformer",
    "ShapesPointTransformer",
    "DiffusersUNet",
    "DiffusersDiT",
    "TimmViT",
    "TimmModel",
    "create_timm",
    "is_token_vit",
    "create_backbone",
    "register_backbone",
    "BACKBONES",
]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "digits_vit": DigitsViT,
    "tiny_sd_unet": lambda **kw: DiffusersUNet(config=TINY_SD_UNET, name="tiny_sd_unet", **kw),
    "tiny_dit": lambda **kw: DiffusersDiT(config=TINY_DIT, name="tiny_dit", **kw),
    "point_mae": lambda **kw: PointTransformer("point_mae", **kw),
    "point_bert": lambda **kw: PointTransformer("point_bert", **kw),
    "shapes_point": ShapesPointTransformer,
}
# "<prefix>:<local folder or file>"
PREFIXED: dict[str, Callable[..., nn.Module]] = {
    "diffusers_unet": lambda source, **kw: DiffusersUNet(source=source, **kw),
    "diffusers_dit": lambda source, **kw: DiffusersDiT(source=source, **kw),
}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = factory
        return factory

    return deco


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A registered mmpeft backbone (`digits_vit`, `shapes_point`, `tiny_sd_unet`, `tiny_dit`, `point_mae`,
    `point_bert`), a prefixed one (`diffusers_unet:<folder>`, `diffusers_dit:<folder>`,
    `open_clip:<model>:image|text`), a timm ViT as a `TimmViT`, or any other timm model as `TimmModel`."""
    if name in BACKBONES:
        return BACKBONES[name](**kwargs)
    prefix, _, rest = name.partition(":")
    if prefix in PREFIXED:
        if not rest:
            raise UnknownName(f"{prefix} backbones are named '{prefix}:<local folder or weights file>', got {name!r}")
        return PREFIXED[prefix](rest, **kwargs)
    if name.startswith("open_clip:"):  # "open_clip:ViT-B-32:image" or "...:text"
        _, model, tower = (name.split(":") + [""])[:3]
        if tower not in ("image", "text"):
            raise UnknownName(f"open_clip backbones are named 'open_clip:<model>:image' or ':text', got {name!r}")
        kwargs.pop("img_size", None)
        return (ClipImageTower if tower == "image" else ClipTextTower)(model, **kwargs)
    import timm  # noqa: PLC0415

    if not timm.is_model(name):
        raise UnknownName(
            f"unknown backbone {name!r}: neither an mmpeft backbone ({', '.join(sorted(BACKBONES))}; "
            f"{', '.join(p + ':<path>' for p in PREFIXED)}; open_clip:<model>:image|text) nor a timm model name "
            "(see timm.list_models())"
        )
    try:
        return TimmViT(name, **kwargs)
    except NotSupported:
        return TimmModel(name, **kwargs)
