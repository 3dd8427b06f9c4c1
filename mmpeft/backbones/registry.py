"""The backbone registry: each backbone registers its names where it is defined.

`@register_backbone("digits_vit", ...)` on a class or factory adds a name; `@register_backbone_prefix("open_clip",
...)` adds a family of names `<prefix>:<rest>` whose factory takes the rest (a local folder, a model name). Every
name that is neither is a timm model (`create_backbone` resolves it last). `describe_backbones` feeds
`mmpeft backbones`, and `backbone_names` the help and errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from mmpeft.core.errors import NotSupported, UnknownName

__all__ = [
    "BackboneEntry",
    "register_backbone",
    "register_backbone_prefix",
    "create_backbone",
    "create_without_pretraining",
    "backbone_names",
    "describe_backbones",
    "registered_names",
]

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class BackboneEntry:
    """A registered name (or prefix): how to build it and what `mmpeft backbones` says of it."""

    name: str
    factory: Callable[..., nn.Module]
    family: str
    takes_weights: bool
    description: str
    usage: str  # how a user spells it: the name, or "<prefix>:<path>"


_NAMES: dict[str, BackboneEntry] = {}
_PREFIXES: dict[str, BackboneEntry] = {}


def _family_of(factory: Callable[..., nn.Module], family: str | None) -> str:
    if family is not None:
        return family
    return str(getattr(factory, "family", "generic")) if isinstance(factory, type) else "generic"


def _description(factory: Callable[..., nn.Module], description: str) -> str:
    if description:
        return description
    return ((factory.__doc__ or "").strip().splitlines() or [""])[0]


def register_backbone(
    name: str, *, family: str | None = None, takes_weights: bool = True, description: str = ""
) -> Callable[[Factory], Factory]:
    """Register `factory(**kwargs) -> backbone` under `name` (a class's `family` is read from the class)."""

    def deco(factory: Factory) -> Factory:
        if name in _NAMES and _NAMES[name].factory is not factory:
            raise ValueError(f"backbone name {name!r} is registered twice")
        entry = BackboneEntry(
            name, factory, _family_of(factory, family), takes_weights, _description(factory, description), name
        )
        _NAMES[name] = entry
        return factory

    return deco


def register_backbone_prefix(
    prefix: str, *, usage: str, family: str | None = None, takes_weights: bool = True, description: str = ""
) -> Callable[[Factory], Factory]:
    """Register `factory(rest, **kwargs) -> backbone` for the names `<prefix>:<rest>` (the factory refuses a rest it
    cannot use, an empty one included); `usage` spells them for help and errors (`diffusers_unet:<path>`)."""

    def deco(factory: Factory) -> Factory:
        if prefix in _PREFIXES and _PREFIXES[prefix].factory is not factory:
            raise ValueError(f"backbone prefix {prefix!r} is registered twice")
        entry = BackboneEntry(
            prefix, factory, _family_of(factory, family), takes_weights, _description(factory, description), usage
        )
        _PREFIXES[prefix] = entry
        return factory

    return deco


def registered_names() -> list[str]:
    """The plain registered names (no prefixes, no timm)."""
    return sorted(_NAMES)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A registered mmpeft backbone (`digits_vit`, `shapes_point`, `tiny_sd_unet`, `tiny_dit`, `point_mae`,
    `point_bert`), a prefixed one (`diffusers_unet:<folder>`, `diffusers_dit:<folder>`,
    `open_clip:<model>:image|text`), a timm ViT as a `TimmViT`, or any other timm model as `TimmModel`."""
    if name in _NAMES:
        return _NAMES[name].factory(**kwargs)
    prefix, _, rest = name.partition(":")
    if prefix in _PREFIXES:  # the factory checks the rest (it knows what its names hold)
        return _PREFIXES[prefix].factory(rest, **kwargs)
    return _create_timm(name, **kwargs)


def create_without_pretraining(name: str, **kwargs: Any) -> nn.Module:
    """`create_backbone`, except that mmpeft's quickstart backbones (those with a registered weights builder) are
    built with random weights instead of running or reading their upstream pretraining: for counts and timings,
    which do not depend on the weights. `kwargs` go to every other backbone."""
    from mmpeft.backbones.weights import WEIGHTS_BUILDERS

    if name in WEIGHTS_BUILDERS:
        return create_backbone(name, pretrained=False)
    return create_backbone(name, **kwargs)


def _create_timm(name: str, **kwargs: Any) -> nn.Module:
    import timm  # keeps `import mmpeft` light

    from mmpeft.backbones.timm_vit import TimmModel, TimmViT

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(_NAMES), n=3)
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
    return ", ".join([*sorted(_NAMES), *(entry.usage for entry in _PREFIXES.values())])


def describe_backbones(filter: str | None = None) -> list[dict[str, Any]]:
    """One row per registered name and prefix (and timm's), keeping those whose name, family or description
    contains `filter` (case-insensitive): name, family, takes_weights, description."""
    rows = [
        *(_NAMES[name] for name in sorted(_NAMES)),
        *_PREFIXES.values(),
    ]
    table = [
        {"name": e.usage, "family": e.family, "takes_weights": e.takes_weights, "description": e.description}
        for e in rows
    ]
    table.append(
        {
            "name": "<timm model name>",
            "family": "timm",
            "takes_weights": True,
            "description": "any timm model: ViTs in the token anatomy (TimmViT), others by module name (TimmModel)",
        }
    )
    if filter:
        needle = filter.lower()
        table = [row for row in table if any(needle in str(row[k]).lower() for k in ("name", "family", "description"))]
    return table
