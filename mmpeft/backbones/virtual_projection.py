"""Any2Point's 3D-to-any virtual projection: positions for 3-D tokens read off a frozen 2-D or 1-D source's own
position table (Tang et al., "Any2Point: Empowering Any-modality Large Models for Efficient 3D Understanding",
ECCV 2024, arXiv 2404.07989; Ivan-Tang-3D/Any2Point `models/peft_module/mv_utils.py`, `models/backbone/pointvit.py`).

Each token centre is rotated into six fixed views (PointCLIP's: four about one axis at 0/90/180/270 degrees, top and
bottom). For a 2-D source the rotated centre, pushed back along z, is projected in perspective onto the source's
image (pixel centres at -0.5 offsets, wrapped modulo the image size) and the patch-position grid is sampled there
bilinearly (align_corners: pixel 0 is cell 0, the last pixel the last cell; zeros outside). For a 1-D source each
rotated cloud is projected on a fixed direction through its centroid, min-max scaled per cloud to the table's length
and interpolated linearly between table rows. A token's position is the mean over the views. Frozen and
parameter-free.

Not copied from the official code:
- the 2-D sampler returns [B*V, C, G] and the code reshapes it to [B, V, G, C] without a transpose, so each token's
  position mixes channels of every token's (here the sampled rows are the tokens' own);
- the 1-D rescale divides by the *batch's* max - min, so a cloud's positions depend on its batch (here the fixed
  (L - 1) / L that maps [0, L) onto the table's rows, per cloud);
- at an exact integer 1-D position floor = ceil and both interpolation weights are zero, a zero position (here the
  weights are (1 - frac, frac), so the row itself).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["VIEW_ANGLES", "view_rotations", "project_2d", "sample_grid", "project_1d", "interpolate_rows"]

# (x, y, z) Euler angles of the six views: four about the x axis, then two about y (mv_utils.py `get_pos`)
VIEW_ANGLES = (
    (0.0, 0.0, math.pi / 2), (math.pi / 2, 0.0, math.pi / 2), (math.pi, 0.0, math.pi / 2),
    (3 * math.pi / 2, 0.0, math.pi / 2), (0.0, -math.pi / 2, math.pi / 2), (0.0, math.pi / 2, math.pi / 2),
)  # fmt: skip


def view_rotations(views: int = 6, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[V, 3, 3] rotations R = Rx Ry Rz of the first `views` views (computed once in fp64); a point p maps to R p."""
    if not 1 <= views <= len(VIEW_ANGLES):
        raise ValueError(f"views must be in 1..{len(VIEW_ANGLES)}, got {views}")
    return _rotations_fp64()[:views].to(dtype=dtype, device=device)


@functools.cache
def _rotations_fp64() -> torch.Tensor:
    mats = []
    for x, y, z in VIEW_ANGLES:
        cx, sx, cy, sy, cz, sz = math.cos(x), math.sin(x), math.cos(y), math.sin(y), math.cos(z), math.sin(z)
        rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
        ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
        rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
        mats.append(rx @ ry @ rz)
    return torch.stack(mats)


def _rotated(centres: torch.Tensor, views: int) -> torch.Tensor:
    """[B, G, 3] -> [B, G, V, 3]: each centre in every view."""
    rot = view_rotations(views, centres.dtype, centres.device)
    return torch.einsum("vij,bgj->bgvi", rot, centres)


def project_2d(centres: torch.Tensor, image_size: tuple[int, int], shift: float, views: int = 6) -> torch.Tensor:
    """Pixel coordinates [B, G, V, 2] (column, row) of the token centres [B, G, 3] on a (height, width) image:
    each view's rotated centre, moved to z - shift (the official `--trans`, e.g. -1.8), projected as (x / z, y / z)
    and mapped to ((u + 1) * size / 2 - 0.5) modulo the size."""
    height, width = image_size
    p = _rotated(centres, views)
    z = p[..., 2] - shift
    u, v = p[..., 0] / (z + 1e-12), p[..., 1] / (z + 1e-12)
    col = torch.remainder((u + 1) * width / 2 - 0.5, width)
    row = torch.remainder((v + 1) * height / 2 - 0.5, height)
    return torch.stack([col, row], dim=-1)


def sample_grid(grid: torch.Tensor, pixels: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The position grid [gh, gw, C] sampled bilinearly at pixel coordinates [B, ...(2)] (column, row) of an image of
    `image_size` (height, width): pixel 0 is cell 0 and the last pixel the last cell (align_corners), zeros outside.
    Returns [B, ..., C]."""
    height, width = image_size
    b, lead = pixels.shape[0], pixels.shape[1:-1]
    norm = torch.stack([2 * pixels[..., 0] / (width - 1) - 1, 2 * pixels[..., 1] / (height - 1) - 1], dim=-1)
    table = grid.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1).to(pixels.dtype)  # [B, C, gh, gw]
    out = F.grid_sample(table, norm.reshape(b, -1, 1, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.squeeze(-1).transpose(1, 2).reshape(b, *lead, grid.shape[-1])  # [B, C, n] -> [B, n, C]: the fix


def project_1d(
    centres: torch.Tensor, length: int, direction: tuple[float, float, float], views: int = 6
) -> torch.Tensor:
    """Positions [B, G, V, 1] in [0, length - 1] of the token centres on a 1-D source's table of `length` rows: per
    view, the rotated cloud projected on the unit `direction` through its centroid, min-max scaled per cloud to
    [0, length), shifted by -0.5 and wrapped (the official mapping), then scaled by (length - 1) / length onto the
    rows."""
    axis = torch.tensor(direction, dtype=centres.dtype, device=centres.device)
    if float(axis.norm()) == 0:
        raise ValueError("the 1-D projection direction must be non-zero")
    p = _rotated(centres, views)  # [B, G, V, 3]
    t = ((p - p.mean(dim=1, keepdim=True)) @ (axis / axis.norm())).unsqueeze(-1)  # [B, G, V, 1]
    low, high = t.amin(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)
    scaled = (t - low) / (high - low).clamp_min(1e-12) * length
    return torch.remainder(scaled - 0.5, length) * (length - 1) / length


def interpolate_rows(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of `table` [L, C] at fractional `positions` [...] in [0, L - 1]: (1 - frac) row floor + frac row floor+1,
    so an integer position gives its row exactly. Returns [..., C]."""
    last = table.shape[0] - 1
    pos = positions.clamp(0, last)
    left = pos.floor().long().clamp(max=max(last - 1, 0))
    frac = (pos - left).unsqueeze(-1).to(table.dtype)
    right = (left + 1).clamp(max=last)
    return (1 - frac) * table[left] + frac * table[right]
