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
    """A tiny backbone and a variant of another shape (for adapter-mismatch checks). The backbone
    itself brings its example inputs and loss (`example_batch`, `example_loss`)."""

    name: str
    build: Callable[[], nn.Module]
    build_other: Callable[[], nn.Module]


def tiny_unet(**overrides) -> nn.Module:
    """The shipped `tiny_sd_unet` (diffusers' (32, 64) test UNet) on 8x8 latents and 4 text tokens."""
    from mmpeft.backbones import TINY_SD_UNET, DiffusersUNet

    return DiffusersUNet(config={**TINY_SD_UNET, **overrides}, name="tiny_sd_unet", example_size=8, example_tokens=4)


def tiny_dit(**overrides) -> nn.Module:
    from mmpeft.backbones import TINY_DIT, DiffusersDiT

    return DiffusersDiT(config={**TINY_DIT, **overrides}, name="tiny_dit", example_size=8)


def tiny_point(**overrides) -> nn.Module:
    """Point-MAE's layout at toy size: 64 points, 8 groups of 8, 2 blocks of 32."""
    from mmpeft.backbones import PointTransformer

    config = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32,
                  pointnet_widths=(16, 32, 64), drop_path_rate=0.1)  # fmt: skip
    return PointTransformer("point_mae", **{**config, **overrides})


def backbone_cases() -> list[BackboneCase]:
    from mmpeft.backbones import TimmModel, TimmViT
    from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
    from tests.toys import ToyPointTower, ToyRegViT, ToyTextTower

    return [
        BackboneCase(
            "timm_vit",
            lambda: TimmViT("test_vit", img_size=32, drop_path_rate=0.1),
            lambda: TimmViT("test_vit", img_size=32, depth=2),
        ),
        BackboneCase("toy_text", ToyTextTower, lambda: ToyTextTower(depth=3)),
        BackboneCase("toy_point", ToyPointTower, lambda: ToyPointTower(dim=48)),
        BackboneCase("point_mae", tiny_point, lambda: tiny_point(depth=3)),
        BackboneCase("toy_reg_vit", ToyRegViT, lambda: ToyRegViT(regs=3)),
        BackboneCase(
            "clip_image", lambda: ClipImageTower(model=tiny_clip()), lambda: ClipImageTower(model=tiny_clip(width=48))
        ),
        BackboneCase(
            "clip_text", lambda: ClipTextTower(model=tiny_clip()), lambda: ClipTextTower(model=tiny_clip(text_width=48))
        ),
        BackboneCase(
            "timm_resnet", lambda: TimmModel("test_resnet", img_size=32), lambda: TimmModel("test_efficientnet")
        ),
        BackboneCase("sd_unet", tiny_unet, lambda: tiny_unet(layers_per_block=1)),
        BackboneCase("dit", tiny_dit, lambda: tiny_dit(num_layers=3)),
    ]


CLIP_VOCAB, CLIP_CONTEXT = 100, 16


def tiny_clip(width: int = 64, text_width: int = 32) -> nn.Module:
    """A random open_clip CLIP small enough for the conformance suite (ViT image tower, causal text tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=width, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=CLIP_VOCAB, width=text_width, heads=4, layers=2)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
