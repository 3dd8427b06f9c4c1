"""Frozen backbones. `create_backbone(name)` resolves mmpeft names first, then timm names."""

from __future__ import annotations

import difflib
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
    "backbone_from_spec",
    "backbone_classes",
    "backbone_names",
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
        close = difflib.get_close_matches(name, list(BACKBONES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownName(
            f"unknown backbone {name!r}{hint}: neither an mmpeft backbone ({backbone_names()}) nor a timm model "
            "name (see timm.list_models())"
        )
    try:
        return TimmViT(name, **kwargs)
    except NotSupported:
        return TimmModel(name, **kwargs)


def backbone_names() -> str:
    """The names `create_backbone` takes besides timm's, for errors and help."""
    return ", ".join([*sorted(BACKBONES), *(f"{p}:<path>" for p in PREFIXED), "open_clip:<model>:image|text"])


def backbone_classes() -> list[str]:
    """The class paths of mmpeft's backbone classes (what `--model.init_args.backbone.class_path` takes)."""
    exported = (globals()[name] for name in __all__)
    return [f"{__name__}.{c.__name__}" for c in exported if isinstance(c, type) and issubclass(c, nn.Module)]


def _looks_like_class_path(name: str) -> bool:
    """`pkg.module.Class` or `Class`: no prefix, a capitalised last part (timm names, tags included, are lower case)."""
    return ":" not in name and name.rsplit(".", 1)[-1][:1].isupper()


def _close_classes(name: str) -> list[str]:
    """The class paths of mmpeft's backbone classes closest to `name` (a full path, or a bare class name)."""
    classes = backbone_classes()
    if "." in name:
        return difflib.get_close_matches(name, classes, n=3, cutoff=0.8)
    short = {path.rsplit(".", 1)[1]: path for path in classes}
    return [short[c] for c in difflib.get_close_matches(name, list(short), n=3, cutoff=0.6)]


def backbone_from_spec(spec: nn.Module | str) -> nn.Module:
    """A built backbone as it is, or a name as `create_backbone` builds it (`--model.init_args.backbone digits_vit`).

    A string that looks like a class path reaches here only when it did not import (the CLI tries it as a class
    first): refuse it with the closest of mmpeft's backbone classes."""
    if isinstance(spec, nn.Module):
        return spec
    if _looks_like_class_path(spec):
        close = _close_classes(spec)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownName(
            f"no backbone class {spec!r}; {hint}mmpeft's backbone classes: {', '.join(backbone_classes())}; "
            f"or a backbone name: {backbone_names()}, a timm model name"
        )
    return create_backbone(spec)
