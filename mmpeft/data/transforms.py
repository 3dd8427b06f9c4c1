"""Image preprocessing the recipes need, in one place, named as the official code does it.

Diffusion training (`diffusion_transform`): resize the short side, crop (centre or random), optionally flip, and
scale to [-1, 1], as diffusers' DreamBooth and text-to-image scripts do.

Training crops: "resize" (straight to a square: VTAB-1k's direct resize, no augmentation),
"resize_crop" (VPT's FGVC: resize to 256/224 of the size, random crop, flip) and
"random_resized_crop" (SSF's `--simple-aug` and CLIP-LoRA: RandomResizedCrop over `crop_scale` of
the area, ratio 3/4-4/3, flip). Evaluation: "resize" (direct) or "center_crop" (resize the short
side to size / `crop_pct`, center crop; VPT 224/256 = 0.875, SSF's timm config 0.9).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TRAIN_CROPS", "EVAL_CROPS", "train_transform", "eval_transform", "diffusion_transform"]

TRAIN_CROPS = ("resize", "resize_crop", "random_resized_crop")
EVAL_CROPS = ("resize", "center_crop")


def _finish(transforms, mean: Sequence[float], std: Sequence[float]) -> list:
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop: str = "resize",
                    crop_scale: Sequence[float] = (0.08, 1.0), interpolation: str = "bicubic"):  # fmt: skip
    from torchvision import transforms

    if crop not in TRAIN_CROPS:
        raise ValueError(f"unknown training crop {crop!r}; choose one of {TRAIN_CROPS}")
    mode = transforms.InterpolationMode(interpolation)
    if crop == "resize":
        first = [transforms.Resize((image_size, image_size), interpolation=mode)]
    elif crop == "resize_crop":
        first = [transforms.Resize(int(image_size * 256 / 224), interpolation=mode), transforms.RandomCrop(image_size),
                 transforms.RandomHorizontalFlip()]  # fmt: skip
    else:
        first = [transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=mode),
                 transforms.RandomHorizontalFlip()]  # fmt: skip
    return transforms.Compose([*first, *_finish(transforms, mean, std)])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop: str = "resize",
                   crop_pct: float = 0.875, interpolation: str = "bicubic"):  # fmt: skip
    from torchvision import transforms

    if crop not in EVAL_CROPS:
        raise ValueError(f"unknown evaluation crop {crop!r}; choose one of {EVAL_CROPS}")
    mode = transforms.InterpolationMode(interpolation)
    if crop == "resize":
        first = [transforms.Resize((image_size, image_size), interpolation=mode)]
    else:
        first = [transforms.Resize(int(image_size / crop_pct), interpolation=mode), transforms.CenterCrop(image_size)]
    return transforms.Compose([*first, *_finish(transforms, mean, std)])


def diffusion_transform(size: int, center_crop: bool = True, random_flip: bool = False,
                        interpolation: str = "bilinear"):  # fmt: skip
    """Resize the short side to `size`, crop `size` x `size` (centre or random), optionally flip, scale to [-1, 1]
    (the VAE's range; diffusers' DreamBooth and text-to-image scripts)."""
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    crop = transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size)
    flip = [transforms.RandomHorizontalFlip()] if random_flip else []
    resize = transforms.Resize(size, interpolation=mode)
    return transforms.Compose([resize, crop, *flip, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
