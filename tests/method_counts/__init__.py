"""Each method's expected trainable backbone count, one module per method (`tests/method_counts/<name>.py` with
`expected(model) -> int`), computed from the backbone's module shapes, independently of how the method declares
its tensors. The conformance suite loads the module of every registered method: a new method adds its file here
and edits no shared test."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from mmpeft.core.method import task_owned
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules

ATTENTION_ENDS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")  # diffusers' attention linears


def expected_count(method: str) -> Callable[[PeftModel], int]:
    """The `expected` function of `tests/method_counts/<method>.py`."""
    try:
        module = importlib.import_module(f"tests.method_counts.{method}")
    except ModuleNotFoundError as err:
        raise AssertionError(f"add tests/method_counts/{method}.py with expected(model) -> int") from err
    return module.expected


def prepare_for_tests(method: str) -> Callable[[PeftModel], None]:
    """The optional `prepare(model)` of `tests/method_counts/<method>.py`: what a method needs beside its weights
    before a forward (Point-PEFT's memory bank, which a run builds from its training split); a no-op otherwise."""
    module = importlib.import_module(f"tests.method_counts.{method}")
    return getattr(module, "prepare", lambda model: None)


def own_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's modules without the method's pieces and without the modules the task owns whole (Any2Point's
    tokenizer and final norm: `task_owned_count` counts them for every method)."""
    pieces = [prefix for prefix, _ in adapter_modules(backbone)]
    owned = set(task_owned(backbone))
    kept = []
    for n, m in backbone.named_modules():
        params = [f"{n}.{p}" if n else p for p, _ in m.named_parameters(recurse=False)]
        if any(n.startswith(p) for p in pieces) or (params and all(p in owned for p in params)):
            continue
        kept.append(m)
    return kept


def task_owned_count(backbone: nn.Module) -> int:
    """Parameters of the backbone's own trainable tensors (`Backbone.task_owned`), which train under every method:
    each method's `expected` counts what it trains beyond them."""
    owned = set(task_owned(backbone))
    return sum(p.numel() for n, p in backbone.named_parameters() if n in owned)


def attention_linears(backbone: nn.Module) -> list[nn.Linear]:
    """Every attention's q, k, v and output projection of a diffusers denoiser."""
    linears = [m for n, m in backbone.named_modules() if n.endswith(ATTENTION_ENDS) and isinstance(m, torch.nn.Linear)]
    assert linears
    return linears
