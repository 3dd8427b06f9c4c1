"""Shared fixtures: tiny backbones (the conformance suite's matrix) and an offline, quiet environment."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@dataclass(frozen=True)
class BackboneCase:
    """A tiny backbone, a variant of another shape (for adapter-mismatch checks) and its inputs."""

    name: str
    build: Callable[[], nn.Module]
    build_other: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]


def _images(size: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda b, g: torch.randn(b, 3, size, size, generator=g)


def backbone_cases() -> list[BackboneCase]:
    from mmpeft.backbones import TimmModel, TimmViT
    from tests.toys import ToyPointTower, ToyRegViT, ToyTextTower

    return [
        BackboneCase(
            "timm_vit",
            lambda: TimmViT("test_vit", img_size=32, drop_path_rate=0.1),
            lambda: TimmViT("test_vit", img_size=32, depth=2),
            _images(32),
        ),
        BackboneCase("toy_text", ToyTextTower, lambda: ToyTextTower(depth=3), ToyTextTower().sample_inputs),
        BackboneCase("toy_point", ToyPointTower, lambda: ToyPointTower(dim=48), ToyPointTower().sample_inputs),
        BackboneCase("toy_reg_vit", ToyRegViT, lambda: ToyRegViT(regs=3), ToyRegViT().sample_inputs),
        BackboneCase(
            "timm_resnet", lambda: TimmModel("test_resnet"), lambda: TimmModel("test_efficientnet"), _images(32)
        ),
    ]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
