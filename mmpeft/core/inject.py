"""Find sub-modules by qualified-name patterns and change them in place: attach, replace, freeze.

Methods attach their trainable pieces to backbone modules as *children plus forward hooks* rather
than wrapping them, so every original tensor keeps its state-dict name (`blocks.0.attn.qkv.weight`
stays that, and a LoRA on it adds `blocks.0.attn.qkv.lora.A`). A converted model therefore still
loads the original checkpoint, and removing the children gives back exactly the backbone's keys.

Three ways to attach (`attach(host, attr, child, where=...)`):
  "output"   y = child(y, x) after the host runs (a scale-shift after a layer, a low-rank delta beside it)
  "input"    x = child(x) before the host runs
  "replace"  y = child(host, x, ...) instead of the host's own computation (QALoRA's Q(W + BA));
             the host's tensors keep their keys, and with the piece switched off (`disabled()`) the
             host runs its original forward.
Pieces on token-anatomy sites (`backbone.sites(...)`) are the fourth kind of placement;
`placements()` lists all of them in one form, which is what merge and unload walk.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.modules import call_piece

__all__ = [
    "match_name",
    "find_modules",
    "find_parameters",
    "close_names",
    "replace_module",
    "attach",
    "detach",
    "attached",
    "Placement",
    "placements",
    "freeze",
    "set_trainable",
    "trainable_names",
]

_HOOK_ATTR = "_mmpeft_attached"  # names of children attached through hooks, per host module
WHERE = ("output", "input", "replace")


def match_name(name: str, pattern: str) -> bool:
    """Glob match of a dotted name, also as a dotted suffix.

    `"attn.qkv"` matches `blocks.3.attn.qkv` (and `model.blocks.3.attn.qkv`); `"blocks.[0-5].mlp.fc1"`,
    `"*resnets.*.conv2"` and `"*.bias"` are globs (`*` also crosses dots).
    """
    if not any(c in pattern for c in "*?["):
        return name == pattern or name.endswith("." + pattern)
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(match_name(name, p) for p in patterns)


def close_names(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Names that look like `pattern` (for 'matches nothing' errors): whole names and dotted suffixes."""
    plain = pattern.strip("*?.")
    suffixes = {".".join(name.split(".")[-k:]) for name in names for k in (1, 2, 3)}
    candidates = sorted(suffixes | set(names))
    return difflib.get_close_matches(plain, candidates, n=n, cutoff=0.6)


def find_modules(
    root: nn.Module,
    patterns: Sequence[str],
    types: tuple[type, ...] | None = None,
    required: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Sub-modules whose qualified names match any pattern (and, if given, are of `types`).

    With `required`, *every* pattern must match at least one module: a typo is refused even when
    another pattern matched, and the error names the pattern and the module names closest to it.
    """
    named = [(name, module) for name, module in root.named_modules() if name]
    found = []
    for pattern in patterns:
        hits = [(n, m) for n, m in named if match_name(n, pattern) and (types is None or isinstance(m, types))]
        if required and not hits:
            kinds = f" of type {'/'.join(t.__name__ for t in types)}" if types else ""
            close = close_names(pattern, [n for n, _ in named])
            hint = f"; close names: {', '.join(close)}" if close else ""
            sample = ", ".join(n for n, _ in named[:6])
            raise NotSupported(
                f"target pattern {pattern!r} matches no module{kinds} in {type(root).__name__}{hint} "
                f"(module names look like: {sample}, ...)"
            )
        found += hits
    seen: set[str] = set()
    return [(n, m) for n, m in found if not (n in seen or seen.add(n))]


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
        if not child.enabled or child.merged:
            return None if self.where == "input" else rest[0]
        if self.where == "input":
            return (call_piece(child, args[0]),) + tuple(args[1:])
        return call_piece(child, rest[0], args[0])


class _ReplacedForward:
    """The instance-level `forward` of a host whose computation an attached child replaces."""

    def __init__(self, host: nn.Module, attr: str):
        self.host, self.attr = host, attr

    def __call__(self, *args, **kwargs):
        child = getattr(self.host, self.attr)
        if not child.enabled or child.merged:  # merged: the host's own tensors hold the piece
            return type(self.host).forward(self.host, *args, **kwargs)
        return child(self.host, *args, **kwargs)


def attach(host: nn.Module, attr: str, child: nn.Module, where: str = "output") -> nn.Module:
    """Add `child` as `host.<attr>` and call it on every forward of `host` (see the module docstring)."""
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    if hasattr(host, attr):
        raise ValueError(f"{type(host).__name__} already has an attribute {attr!r}; detach it first")
    if where == "replace" and isinstance(host.__dict__.get("forward"), _ReplacedForward):
        raise ValueError(f"{type(host).__name__} already has its computation replaced by {host.forward.attr!r}")
    host.add_module(attr, child)
    if where == "output":
        host.register_forward_hook(_CallAttached(attr, where))
    elif where == "input":
        host.register_forward_pre_hook(_CallAttached(attr, where))
    else:
        host.forward = _ReplacedForward(host, attr)
    if not hasattr(host, _HOOK_ATTR):
        setattr(host, _HOOK_ATTR, {})
    getattr(host, _HOOK_ATTR)[attr] = where
    return child


def detach(host: nn.Module, attr: str) -> nn.Module:
    """Undo `attach`: remove the hook (or restore the host's own forward) and the child; returns the child."""
    for hooks in (host._forward_hooks, host._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _CallAttached) and h.attr == attr]:
            del hooks[key]
    if getattr(host.__dict__.get("forward"), "attr", None) == attr:
        del host.__dict__["forward"]
    getattr(host, _HOOK_ATTR).pop(attr)
    child = getattr(host, attr)
    delattr(host, attr)
    return child


def attached(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Every child attached by `attach` below `root`: (host name, host, attribute, child)."""
    for name, host in list(root.named_modules()):
        for attr in list(getattr(host, _HOOK_ATTR, {})):
            yield name, host, attr, getattr(host, attr)


@dataclass
class Placement:
    """Where one piece sits: attached to `host` ("output" / "input" / "replace"), or on the site
    `where = "site:<name>"` of `host` (a block, or the backbone for `before_block.<i>`)."""

    host_name: str
    host: nn.Module
    where: str
    attr: str
    child: nn.Module

    def remove(self) -> None:
        if self.where.startswith("site:"):
            site = dict(self.host.named_sites())[self.where[5:]]
            del site[next(i for i, m in enumerate(site) if m is self.child)]
        else:
            detach(self.host, self.attr)


def placements(root: nn.Module) -> list[Placement]:
    """Every piece below `root`, hook-attached or on a site, in module order."""
    out = []
    for name, module in list(root.named_modules()):
        for attr, where in list(getattr(module, _HOOK_ATTR, {}).items()):
            out.append(Placement(name, module, where, attr, getattr(module, attr)))
        if hasattr(module, "named_sites"):
            for site_name, site in module.named_sites():
                for i, child in enumerate(site):
                    out.append(Placement(name, module, f"site:{site_name}", str(i), child))
    return out


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
