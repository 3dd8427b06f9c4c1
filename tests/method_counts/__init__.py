"""Each method's expected trainable backbone count, one module per method (`tests/method_counts/<name>.py` with
`expected(model) -> int`), computed from the backbone's module shapes, independently of how the method declares
its tensors. The conformance suite loads the module of every registered method: a new method adds its file here
and edits no shared test."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

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
    """The backbone's modules without the method's pieces."""
    pieces = [prefix for prefix, _ in adapter_modules(backbone)]
    return [m for n, m in backbone.named_modules() if not any(n.startswith(p) for p in pieces)]


def attention_linears(backbone: nn.Module) -> list[nn.Linear]:
    """Every attention's q, k, v and output projection of a diffusers denoiser."""
    linears = [m for n, m in backbone.named_modules() if n.endswith(ATTENTION_ENDS) and isinstance(m, torch.nn.Linear)]
    assert linears
    return linears
