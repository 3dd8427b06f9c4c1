"""Point-cloud transforms and resampling on [N, C] tensors (xyz in the first three columns, optional normals next).

Every random transform takes an explicit `torch.Generator`, so a cloud's augmentation is a function of the
generator's seed alone (the datamodule seeds one generator per item; see `mmpeft.data.point_clouds`). Only the xyz
columns move under scale / translate, as in Point-MAE's `PointcloudScaleAndTranslate`; a rotation turns the
normals too (normals are not rescaled, as in the official code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from mmpeft.core.errors import UnknownName

__all__ = [
    "PointTransform", "ScaleAndTranslate", "RotateUp", "RandomSubset", "Compose", "Identity", "AUGMENTS",
    "build_augment", "farthest_point_order", "normalize_unit_sphere", "center",
]  # fmt: skip


class PointTransform(Protocol):
    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def _uniform(low: float, high: float, size: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


class ScaleAndTranslate:
    """Per-axis scale U[scale] then shift U[-translate, translate] (Point-MAE's default training augmentation)."""

    def __init__(self, scale: tuple[float, float] = (2 / 3, 3 / 2), translate: float = 0.2):
        self.scale, self.translate = scale, translate

    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        factor = _uniform(*self.scale, 3, generator)
        shift = _uniform(-self.translate, self.translate, 3, generator)
        out = points.clone()
        out[:, :3] = points[:, :3] * factor + shift
        return out

    def __repr__(self) -> str:
        return f"ScaleAndTranslate(scale={self.scale}, translate={self.translate})"


class RotateUp:
    """Per-axis scale U[scale], then a rotation about the y (up) axis by U[-angle, angle].

    Point-PEFT's "-aug" ScanObjectNN protocol (scale U[0.9, 1.1] without shift, y-rotation U[-pi, pi]): the
    scanned objects stand upright but face any direction, so only the up axis is kept.
    """

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), angle: float = math.pi):
        self.scale, self.angle = scale, angle

    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        factor = _uniform(*self.scale, 3, generator)
        theta = float(_uniform(-self.angle, self.angle, 1, generator))
        cos, sin = math.cos(theta), math.sin(theta)
        rotation = torch.tensor([[cos, 0.0, -sin], [0.0, 1.0, 0.0], [sin, 0.0, cos]], dtype=points.dtype)
        out = points.clone()
        out[:, :3] = (points[:, :3] * factor) @ rotation  # row vectors: x' = x cos + z sin, z' = -x sin + z cos
        if points.shape[1] >= 6:
            out[:, 3:6] = points[:, 3:6] @ rotation
        return out

    def __repr__(self) -> str:
        return f"RotateUp(scale={self.scale}, angle={self.angle:.4f})"


class RandomSubset:
    """`n` of the first `pool` points, in random order: the official "FPS to 1.2 n, then a random n-subset" when
    the cloud is stored in FPS order (its first `pool` points are the FPS to `pool`); with pool == n it is the
    per-epoch point shuffle."""

    def __init__(self, n: int, pool: int):
        if pool < n:
            raise ValueError(f"cannot draw {n} points from a pool of {pool}")
        self.n, self.pool = n, pool

    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return points[torch.randperm(self.pool, generator=generator)[: self.n]]

    def __repr__(self) -> str:
        return f"RandomSubset(n={self.n}, pool={self.pool})"


class Identity:
    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return points

    def __repr__(self) -> str:
        return "Identity()"


class Compose:
    """Transforms applied in turn, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[PointTransform]):
        self.transforms = list(transforms)

    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in self.transforms:
            points = transform(points, generator)
        return points

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


AUGMENTS = ("scale_translate", "rotate", "none")


def build_augment(name: str) -> PointTransform:
    """The named training augmentation: "scale_translate" (Point-MAE), "rotate" (Point-PEFT -aug), "none"."""
    if name == "scale_translate":
        return ScaleAndTranslate()
    if name == "rotate":
        return RotateUp()
    if name == "none":
        return Identity()
    raise UnknownName(f"unknown point-cloud augmentation {name!r}; choose one of {AUGMENTS}")


def center(points: torch.Tensor) -> torch.Tensor:
    """Clouds [..., N, C] with their xyz centroid moved to the origin (Any2Point's ScanObjectNN preprocessing)."""
    out = points.clone()
    out[..., :3] = points[..., :3] - points[..., :3].mean(dim=-2, keepdim=True)
    return out


def normalize_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Clouds [..., N, C] centred and divided by their largest xyz norm (ModelNet's `pc_normalize`)."""
    out = center(points)
    radius = out[..., :3].norm(dim=-1).amax(dim=-1, keepdim=True).clamp_min(1e-12)
    out[..., :3] = out[..., :3] / radius[..., None]
    return out


def farthest_point_order(xyz: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Indices [B, k] of farthest point sampling on clouds [B, N, 3], starting at point 0 (as pointnet2's CUDA op),
    `chunk` clouds at a time (to bound memory). A prefix of an FPS order is the FPS to that length, so one order of
    length k serves every smaller count."""
    from mmpeft.ops.point import farthest_point_sample

    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"expected clouds [B, N, 3], got {tuple(xyz.shape)}")
    if not 0 < k <= xyz.shape[1]:
        raise ValueError(f"cannot sample {k} of {xyz.shape[1]} points")
    return torch.cat([farthest_point_sample(xyz[i : i + chunk].float(), k) for i in range(0, len(xyz), chunk)])
