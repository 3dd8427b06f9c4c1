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
    from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
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
            "clip_image",
            lambda: ClipImageTower(model=tiny_clip()),
            lambda: ClipImageTower(model=tiny_clip(width=48)),
            _images(32),
        ),  # fmt: skip
        BackboneCase(
            "clip_text",
            lambda: ClipTextTower(model=tiny_clip()),
            lambda: ClipTextTower(model=tiny_clip(text_width=48)),
            clip_text_ids,
        ),  # fmt: skip
        BackboneCase(
            "timm_resnet", lambda: TimmModel("test_resnet"), lambda: TimmModel("test_efficientnet"), _images(32)
        ),
    ]


CLIP_VOCAB, CLIP_CONTEXT = 100, 16


def tiny_clip(width: int = 64, text_width: int = 32) -> nn.Module:
    """A random open_clip CLIP small enough for the conformance suite (ViT image tower, causal text tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=width, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=CLIP_VOCAB, width=text_width, heads=4, layers=2)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def clip_text_ids(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids as open_clip's tokenizer lays them out: tokens, the EOT (highest id), zero padding."""
    ids = torch.randint(1, CLIP_VOCAB - 1, (batch, CLIP_CONTEXT), generator=generator)
    eot = torch.randint(2, CLIP_CONTEXT, (batch,), generator=generator)
    for row, pos in enumerate(eot.tolist()):
        ids[row, pos] = CLIP_VOCAB - 1
        ids[row, pos + 1 :] = 0
    return ids


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
