"""Frozen backbones. Each registers its names where it is defined (`mmpeft.backbones.registry`);
`create_backbone(name)` resolves mmpeft names first, then timm names."""

from __future__ import annotations

import difflib

from torch import nn

from mmpeft.backbones.any2point import Any2Point
from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
from mmpeft.backbones.diffusion import DiffusersUNet
from mmpeft.backbones.digits import DigitsViT
from mmpeft.backbones.digits_dit import DigitsDiT
from mmpeft.backbones.dit import DiffusersDiT
from mmpeft.backbones.point import PointTransformer
from mmpeft.backbones.registry import (
    backbone_names,
    create_backbone,
    describe_backbones,
    register_backbone,
    register_backbone_prefix,
)
from mmpeft.backbones.shapes import ShapesPointTransformer
from mmpeft.backbones.timm_vit import TimmModel, TimmViT, create_timm, is_token_vit
from mmpeft.backbones.tiny_diffusers import TINY_DIT, TINY_SD_UNET
from mmpeft.core.errors import UnknownName

__all__ = [
    "Any2Point",
    "ClipImageTower",
    "ClipTextTower",
    "DigitsViT",
    "DigitsDiT",
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
    "describe_backbones",
    "TINY_DIT",
    "TINY_SD_UNET",
    "register_backbone",
    "register_backbone_prefix",
]


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
