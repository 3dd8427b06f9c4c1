"""Which modules a name-targeted method attaches to: the user's patterns, or the method's default for
the backbone's family.

A pattern the user gives must match at least one module, or the method refuses and names it (a typo
is never skipped because another pattern matched). A method's *default* targets come from a table
keyed by `backbone.family` ("token", "unet", "dit", "timm", ..., "*" for any other) and contain only
what that family can have: default patterns that match nothing on this particular backbone are
dropped (SSF's `patch_embed.proj` on a point transformer), as long as one of them matches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import find_modules

__all__ = ["family_of", "resolve_targets", "select_modules", "DefaultTargets", "LINEAR_TARGETS_HELP"]

# The `targets` option of the methods that adapt named linears (LoRA, SVFit), one wording for both.
LINEAR_TARGETS_HELP = (
    "module-name patterns (globs) of the Linear / Conv2d layers to adapt, each must match; a trailing [q,k,v] "
    "selects parts of a fused qkv; unset: the backbone family's default (token backbones: attn.qkv[q,v]; UNets, "
    "DiTs: to_q, to_k, to_v, to_out.0)"
)

DefaultTargets = Mapping[str, Sequence[str] | Callable[[nn.Module], Sequence[str]]]


def family_of(backbone: nn.Module) -> str:
    return getattr(backbone, "family", "generic")


def resolve_targets(
    backbone: nn.Module, method: str, user: Sequence[str] | None, defaults: DefaultTargets
) -> tuple[list[str], bool]:
    """(patterns, strict): the user's patterns (each must match), or the family default (not strict)."""
    if user is not None:
        if not user:
            raise ValueError(f"{method}: targets is empty; leave it unset for the backbone family's default")
        return list(user), True
    family = family_of(backbone)
    default = defaults.get(family, defaults.get("*"))
    if default is None:
        known = ", ".join(sorted(k for k in defaults if k != "*"))
        raise NotSupported(
            f"{method} has no default targets for {family!r} backbones ({type(backbone).__name__} "
            f"{getattr(backbone, 'name', '')!r}); pass targets=[...] (module-name patterns); defaults exist for: "
            f"{known}"
        )
    return list(default(backbone) if callable(default) else default), False


def select_modules(
    backbone: nn.Module,
    method: str,
    user: Sequence[str] | None,
    defaults: DefaultTargets,
    pattern_of: Callable[[str], str] = lambda target: target,
) -> list[tuple[str, str, nn.Module]]:
    """(target, module name, module) for every module the targets select, in target order.

    `pattern_of` turns a target into its module-name pattern (LoRA's `attn.qkv[q,v]` -> `attn.qkv`).
    """
    patterns, strict = resolve_targets(backbone, method, user, defaults)
    found = [
        (p, name, module) for p in patterns for name, module in find_modules(backbone, [pattern_of(p)], required=strict)
    ]
    if not found:
        raise NotSupported(
            f"none of {method}'s default targets {patterns} exists in {type(backbone).__name__} "
            f"{getattr(backbone, 'name', '')!r}; pass targets=[...] (module-name patterns)"
        )
    seen: set[str] = set()
    return [(p, n, m) for p, n, m in found if not (n in seen or seen.add(n))]
