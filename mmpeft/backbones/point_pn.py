"""Any2Point's trainable point tokenizer: a Point-PN encoder (Zhang et al., "Parameter is Not All You Need:
Starting from Non-Parametric Networks for 3D Point Cloud Analysis", CVPR 2023, arXiv 2303.08134) as Any2Point
ships it (Ivan-Tang-3D/Any2Point, `models/backbone/Point_PN.py`, `Point_PN_scan`), in pure PyTorch.

A raw point embedding (Conv1d 3 -> C0 without bias, BN, ReLU), then stages that each halve the centres: FPS,
kNN over the previous stage's points, neighbour offsets normalised, [neighbour feature, centre feature]
concatenated (doubling the width), a parameter-free sin/cos geometry encoding of the offsets added, residual
1x1-conv bottleneck blocks with BN, and a max over the neighbours. At Any2Point's size (1,024 points, C0 = 96,
three stages to 512 / 256 / 128 centres, k = 64 or 81, [2, 1, 1] blocks, bottleneck C/2 except 32 in the last
stage) it has 276,672 parameters and gives 128 tokens of width 768; a final linear maps to another source width
(the official code's `proj`, Identity when the widths match).

Not copied: the ModelNet ("mn40") normalisation divides the offsets by the standard deviation of the whole
batch's offsets, so a cloud's tokens depend on the other clouds in its batch; here each cloud's own standard
deviation. The ScanObjectNN ("scan") normalisation divides by the per-axis max |offset| of each neighbourhood; a
neighbourhood flat along an axis (all offsets 0, e.g. duplicated points) divides 0 by 0 there, so an epsilon guards it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PointPNTokenizer", "geometry_encoding", "NORMALIZATIONS"]

NORMALIZATIONS = ("scan", "mn40")


def geometry_encoding(offsets: torch.Tensor, width: int, alpha: float = 1000.0, beta: float = 100.0) -> torch.Tensor:
    """Point-PN's parameter-free encoding of neighbour offsets [B, G, k, 3] as [B, width, G, k]: per axis, sin then
    cos of beta * offset / alpha^(i / f) for i < f = width / 6 (channels: axis-major, sin block then cos block)."""
    if width % 6:
        raise ValueError(f"the geometry encoding needs a width divisible by 6 (3 axes x sin, cos), got {width}")
    f = width // 6
    scales = alpha ** (torch.arange(f, device=offsets.device, dtype=offsets.dtype) / f)
    angles = beta * offsets.unsqueeze(-1) / scales  # [B, G, k, 3, f]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, G, k, 3, 2f]
    b, g, k = offsets.shape[:3]
    return enc.permute(0, 3, 4, 1, 2).reshape(b, width, g, k)


class ResidualBottleneck(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + x) with 1x1 Conv2d layers (the official `Linear2Layer`)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.net2 = nn.Sequential(nn.Conv2d(hidden, width, 1), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net2(self.net1(x)) + x)


class PointPNStage(nn.Module):
    """One stage: FPS to `centres`, kNN of `k`, normalised offsets, [neighbour, centre] features, geometry encoding,
    `blocks` residual bottlenecks, max over the neighbours."""

    def __init__(self, centres: int, k: int, width: int, blocks: int, hidden: int, normalize: str,
                 alpha: float, beta: float):  # fmt: skip
        super().__init__()
        self.centres, self.k, self.width, self.normalize = centres, k, width, normalize
        self.alpha, self.beta = alpha, beta
        self.blocks = nn.Sequential(*(ResidualBottleneck(width, hidden) for _ in range(blocks)))

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(points [B, N, 3], features [B, N, C]) -> (centres [B, G, 3], features [B, G, 2C])."""
        from mmpeft.ops.point import farthest_point_sample, gather_points, knn

        with torch.no_grad():
            pick = farthest_point_sample(xyz, self.centres)
        centres = gather_points(xyz, pick)
        neighbours = knn(centres, xyz, self.k)  # [B, G, k]
        offsets = gather_points(xyz, neighbours) - centres.unsqueeze(2)  # [B, G, k, 3]
        if self.normalize == "scan":
            offsets = offsets / offsets.abs().amax(dim=2, keepdim=True).clamp_min(1e-8)
        else:  # each cloud's own standard deviation (the official code's is the whole batch's)
            offsets = offsets / (offsets.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        near = gather_points(feats, neighbours)  # [B, G, k, C]
        centre_feats = gather_points(feats, pick).unsqueeze(2).expand_as(near)
        x = torch.cat([near, centre_feats], dim=-1).permute(0, 3, 1, 2)  # [B, 2C, G, k]
        x = self.blocks(x + geometry_encoding(offsets, self.width, self.alpha, self.beta).to(x.dtype))
        return centres, x.amax(dim=-1).transpose(1, 2)


class PointPNTokenizer(nn.Module):
    """[B, N, 3] clouds -> (tokens [B, G, out_dim], centres [B, G, 3]); see the module docstring.

    Args:
        num_points: N the stages are sized for (each halves the centres: N/2, N/4, ...).
        out_dim: the token width (the source's); a final linear maps to it when the last stage's width differs.
        raw_width: C0, the raw point embedding's width (each stage doubles it).
        stages: number of stages (G = N / 2^stages tokens).
        k: neighbours per centre in every stage.
        blocks: residual bottlenecks per stage.
        last_bottleneck: the last stage's bottleneck width (the others use half the stage's width).
        normalize: "scan" (per-neighbourhood per-axis max) or "mn40" (standard deviation).
    """

    def __init__(self, num_points: int = 1024, out_dim: int = 768, raw_width: int = 96, stages: int = 3, k: int = 64,
                 blocks: tuple[int, ...] = (2, 1, 1), last_bottleneck: int = 32, normalize: str = "scan",
                 alpha: float = 1000.0, beta: float = 100.0):  # fmt: skip
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if len(blocks) < stages:
            raise ValueError(f"blocks gives {len(blocks)} stage(s) of residual blocks for {stages} stages")
        centres = [num_points // 2 ** (i + 1) for i in range(stages)]
        if centres[-1] < 1 or k > num_points:
            raise ValueError(f"{stages} stages halve {num_points} points to {centres} centres with k={k} neighbours: "
                             "give more points, fewer stages or a smaller k")  # fmt: skip
        self.num_points, self.num_tokens, self.k, self.centres = num_points, centres[-1], k, centres
        self.raw = nn.Sequential(
            nn.Conv1d(3, raw_width, 1, bias=False), nn.BatchNorm1d(raw_width), nn.ReLU(inplace=True)
        )
        width, layers = raw_width, []
        for i in range(stages):
            width *= 2
            hidden = last_bottleneck if i == stages - 1 else width // 2
            layers.append(PointPNStage(centres[i], k, width, blocks[i], hidden, normalize, alpha, beta))
        self.stages = nn.ModuleList(layers)
        self.proj = nn.Linear(width, out_dim) if width != out_dim else nn.Identity()
        self.out_dim = out_dim

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.raw(xyz.transpose(1, 2)).transpose(1, 2)  # [B, N, C0]
        for stage in self.stages:
            xyz, feats = stage(xyz, feats)
        return self.proj(feats), xyz
