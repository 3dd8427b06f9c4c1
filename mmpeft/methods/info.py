"""What `mmpeft methods` and `mmpeft fit --help` say about the registered methods: a one-line summary
each, and a method's options (type, default, one line of help from `Method.options()`) and presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mmpeft.core.method import get_method, list_methods

__all__ = ["method_summary", "spelling", "columns", "methods_epilog", "describe_methods", "describe_method"]


def method_summary(cls: type) -> str:
    """The first sentence of a method's docstring, on one line."""
    text = " ".join((cls.__doc__ or "").split())
    for i, char in enumerate(text):
        end = i + 1 == len(text) or text[i + 1] == " "
        if char == "." and end and not text[:i].endswith(("e.g", "i.e", "et al", "cf", "vs")):
            return text[: i + 1]
    return text


def spelling(value: Any) -> str:
    """A value as written in YAML or on the command line (`null`, `true`, `[a, b]`, quoted when needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(spelling(v) for v in value) + "]"
    if isinstance(value, str):
        plain = value[:1].isalpha() and all(c.isalnum() or c in "_.-/" for c in value)
        keyword = value.lower() in ("null", "true", "false", "yes", "no", "on", "off")
        return value if plain and not keyword else json.dumps(value)
    return str(value)


def columns(rows: list[dict[str, str]], indent: str = "") -> str:
    """Rows as aligned text columns (the last one unpadded, so long help wraps in the terminal)."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys[:-1]]
    line = lambda cells: indent + "  ".join([*(c.ljust(w) for c, w in zip(cells, widths)), cells[-1]]).rstrip()
    return "\n".join([line(keys), *(line([r[k] for k in keys]) for r in rows)])


def methods_epilog() -> str:
    """The registered methods, for `mmpeft fit --help` and the other LightningCLI subcommands."""
    return (
        f"methods for --model.method (NAME, or {{name: NAME, preset: PRESET, OPTION: VALUE}}; `mmpeft methods NAME` "
        f"lists a method's options and presets): {', '.join(list_methods())}"
    )


def describe_methods() -> str:
    """`mmpeft methods`: one line per registered method."""
    yes = lambda flag: "yes" if flag else "no"
    rows = [
        {"method": c.name, "mergeable": yes(c.mergeable), "token backbones only": yes(c.needs_tokens),
         "summary": method_summary(c)}
        for c in (get_method(n) for n in list_methods())
    ]  # fmt: skip
    return (
        columns(rows) + "\n\n`mmpeft methods NAME`: a method's options and presets; pick one with --model.method NAME"
    )


def describe_method(name: str) -> str:
    """`mmpeft methods NAME`: the method's options (type, default, one line of help) and presets."""
    yes = lambda flag: "yes" if flag else "no"
    cls = get_method(name)
    options = [
        {"option": o["name"], "type": o["type"],
         "default": "(required)" if o["default"] is dataclasses.MISSING else spelling(o["default"]), "help": o["help"]}
        for o in cls.options()
    ]  # fmt: skip
    values = {p: cls.preset(p).config() for p in ("default", *cls.presets)}
    presets = [{"preset": p, **{k: spelling(v) for k, v in c.items()}} for p, c in values.items()]
    return "\n".join([
        f"{cls.name}: {method_summary(cls)}",
        f"mergeable: {yes(cls.mergeable)}; token backbones only: {yes(cls.needs_tokens)}",
        f"\noptions (--model.method '{{name: {cls.name}, OPTION: VALUE}}'):",
        columns(options, indent="  "),
        f"\npresets (--model.method '{{name: {cls.name}, preset: PRESET}}'; options override them):",
        columns(presets, indent="  "),
    ])  # fmt: skip
