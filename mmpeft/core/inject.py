"""Find sub-modules by qualified-name patterns and change them in place: attach, replace, freeze.

Methods attach their trainable pieces to backbone modules as *children plus forward hooks* rather
than wrapping them, so every original tensor keeps its state-dict name (`blocks.0.attn.qkv.weight`
stays that, and a LoRA on it adds `blocks.0.attn.qkv.lora.A`). A converted model therefore still
loads the original checkpoint, and removing the children gives back exactly the backbone's keys.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence

from torch import nn

from mmpeft.core.errors import NotSupported

__all__ = [
    "match_name",
    "find_modules",
    "find_parameters",
    "replace_module",
    "attach",
    "detach",
    "attached",
    "freeze",
    "set_trainable",
    "trainable_names",
]

_HOOK_ATTR = "_mmpeft_attached"  # names of children attached through hooks, per host module


def match_name(name: str, pattern: str) -> bool:
    """Glob match of a dotted name; a pattern without wildcards also matches as a dotted suffix.

    `"attn.qkv"` matches `blocks.3.attn.qkv`; `"blocks.[0-5].mlp.fc1"` and `"*.bias"` are globs.
    """
    if fnmatch.fnmatchcase(name, pattern):
        return True
    if not any(c in pattern for c in "*?["):
        return name.endswith("." + pattern)
    return False


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(match_name(name, p) for p in patterns)


def find_modules(
    root: nn.Module,
    patterns: Sequence[str],
    types: tuple[type, ...] | None = None,
    required: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Sub-modules whose qualified names match any pattern (and, if given, are of `types`)."""
    found = [
        (name, module)
        for name, module in root.named_modules()
        if name and _matches_any(name, patterns) and (types is None or isinstance(module, types))
    ]
    if required and not found:
        kinds = f" of type {'/'.join(t.__name__ for t in types)}" if types else ""
        sample = ", ".join(n for n, _ in list(root.named_modules())[1:8])
        raise NotSupported(
            f"no module{kinds} matches {list(patterns)} in {type(root).__name__}; module names look like: {sample}, ..."
        )
    return found


def find_parameters(root: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in root.named_parameters() if _matches_any(n, patterns)]


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was; returns the old module."""
    parent, attr = _parent(root, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


class _CallAttached:
    """Forward hook that calls the attached child by attribute name (deepcopy- and pickle-safe)."""

    def __init__(self, attr: str, where: str):
        self.attr, self.where = attr, where

    def __call__(self, host: nn.Module, args: tuple, *rest):
        child = getattr(host, self.attr)
        if not child.enabled or getattr(child, "merged", False):
            return None if self.where == "input" else rest[0]
        if self.where == "input":
            return (child(args[0]),) + tuple(args[1:])
        return child(rest[0], args[0])


def attach(host: nn.Module, attr: str, child: nn.Module, where: str = "output") -> nn.Module:
    """Add `child` as `host.<attr>` and call it on every forward of `host`.

    `where="output"`: `y = child(y, x)` (scale-shift after a layer, a low-rank delta beside it).
    `where="input"`: `x = child(x)` before the layer runs.
    """
    if where not in ("output", "input"):
        raise ValueError(f"where must be 'output' or 'input', got {where!r}")
    if hasattr(host, attr):
        raise ValueError(f"{type(host).__name__} already has an attribute {attr!r}; detach it first")
    host.add_module(attr, child)
    if where == "output":
        host.register_forward_hook(_CallAttached(attr, where))
    else:
        host.register_forward_pre_hook(_CallAttached(attr, where))
    if not hasattr(host, _HOOK_ATTR):
        setattr(host, _HOOK_ATTR, [])
    getattr(host, _HOOK_ATTR).append(attr)
    return child


def detach(host: nn.Module, attr: str) -> nn.Module:
    """Undo `attach`: remove the hook and the child; returns the child."""
    for hooks in (host._forward_hooks, host._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _CallAttached) and h.attr == attr]:
            del hooks[key]
    getattr(host, _HOOK_ATTR).remove(attr)
    child = getattr(host, attr)
    delattr(host, attr)
    return child


def attached(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Every attached child below `root`: (host name, host, attribute, child)."""
    for name, host in list(root.named_modules()):
        for attr in list(getattr(host, _HOOK_ATTR, [])):
            yield name, host, attr, getattr(host, attr)


def freeze(module: nn.Module) -> None:
    module.requires_grad_(False)


def set_trainable(root: nn.Module, names: Iterable[str]) -> None:
    """Exactly the named parameters of `root` train; every other one is frozen."""
    wanted = set(names)
    params = dict(root.named_parameters())
    unknown = wanted - params.keys()
    if unknown:
        raise KeyError(f"no such parameters: {sorted(unknown)[:5]}")
    for name, p in params.items():
        p.requires_grad_(name in wanted)


def trainable_names(root: nn.Module) -> set[str]:
    return {n for n, p in root.named_parameters() if p.requires_grad}
