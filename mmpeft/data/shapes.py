"""Procedural 3-D shapes: the offline point-cloud quickstart's upstream and downstream tasks.

Upstream: ten primitives (sphere, cube, cylinder, cone, torus, pyramid, disc, helix, cross, capsule),
on which mmpeft pretrains a small point transformer. Downstream: nine objects composed of those
primitives (snowman, three-ball snowman, dumbbell, table, stool, chair, mushroom, lamp, arrow), classes
the backbone never saw and some of them alike, lying on their side where the upstream shapes stand upright,
so a probe or a PEFT method on top of it measures a real transfer. Every cloud is sampled on the surface
with each shape's proportions jittered per sample, cut by a random plane (a one-sided scan keeping
70-100% of the object), rotated about the up (y) axis, scaled anisotropically, jittered with Gaussian
noise, centred and scaled into the unit sphere, as the ScanObjectNN / ModelNet40 loaders return them.
Everything is a function of the seed: no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mmpeft.data.fewshot import k_shot_indices
from mmpeft.data.point_clouds import PointClouds
from mmpeft.data.point_transforms import RandomSubset
from mmpeft.data.sampling import split_loader
from mmpeft.data.splits import SplitLoaders

__all__ = ["UPSTREAM", "DOWNSTREAM", "ShapesDataModule", "make_shape", "shapes_arrays"]

Part = Callable[[int, torch.Generator], torch.Tensor]


def _u(g: torch.Generator, lo: float, hi: float, n: int | tuple = 1) -> torch.Tensor:
    size = (n,) if isinstance(n, int) else n
    return lo + (hi - lo) * torch.rand(size, generator=g)


def _shares(n: int, weights: list[float]) -> list[int]:
    counts = [int(n * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    return counts


# -- surface samplers (y is up) -------------------------------------------------------------------------------
def sphere(n: int, g: torch.Generator, r: float = 1.0, squash: tuple = (1.0, 1.0, 1.0)) -> torch.Tensor:
    p = torch.randn(n, 3, generator=g)
    return r * p / p.norm(dim=1, keepdim=True).clamp_min(1e-8) * torch.tensor(squash)


def hemisphere(n: int, g: torch.Generator, r: float = 1.0) -> torch.Tensor:
    p = sphere(n, g, r)
    return torch.stack([p[:, 0], p[:, 1].abs(), p[:, 2]], dim=1)


def box(n: int, g: torch.Generator, size: tuple = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """The surface of an axis-aligned box centred at 0, faces chosen by area."""
    sx, sy, sz = size
    areas = torch.tensor([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy])
    face = torch.multinomial(areas, n, replacement=True, generator=g)
    p = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor(size)
    axis, sign = face // 2, (face % 2) * 2 - 1
    half = torch.tensor(size)[axis] / 2
    p[torch.arange(n), axis] = sign * half
    return p


def cylinder(n: int, g: torch.Generator, r: float = 0.5, h: float = 1.0, caps: bool = True) -> torch.Tensor:
    side, cap = 2 * math.pi * r * h, (2 * math.pi * r * r if caps else 0.0)
    on_side = torch.rand(n, generator=g) < side / (side + cap)
    theta = _u(g, 0, 2 * math.pi, n)
    rad = torch.where(on_side, torch.full((n,), r), r * torch.rand(n, generator=g).sqrt())
    y = torch.where(on_side, _u(g, -h / 2, h / 2, n), torch.sign(torch.rand(n, generator=g) - 0.5) * h / 2)
    return torch.stack([rad * theta.cos(), y, rad * theta.sin()], dim=1)


def cone(n: int, g: torch.Generator, r: float = 0.6, h: float = 1.2) -> torch.Tensor:
    slant = math.sqrt(r * r + h * h)
    side, base = math.pi * r * slant, math.pi * r * r
    on_side = torch.rand(n, generator=g) < side / (side + base)
    theta = _u(g, 0, 2 * math.pi, n)
    t = torch.rand(n, generator=g).sqrt()  # area-uniform along the slant
    rad = torch.where(on_side, r * t, r * torch.rand(n, generator=g).sqrt())
    y = torch.where(on_side, h / 2 - h * t, torch.full((n,), -h / 2))
    return torch.stack([rad * theta.cos(), y, rad * theta.sin()], dim=1)


def torus(n: int, g: torch.Generator, big: float = 0.7, small: float = 0.25) -> torch.Tensor:
    u, v = _u(g, 0, 2 * math.pi, n), _u(g, 0, 2 * math.pi, n)
    ring = big + small * v.cos()
    return torch.stack([ring * u.cos(), small * v.sin(), ring * u.sin()], dim=1)


def pyramid(n: int, g: torch.Generator, base: float = 1.2, h: float = 1.0) -> torch.Tensor:
    on_base = torch.rand(n, generator=g) < 0.3
    a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    t = b.sqrt()  # triangle faces: area-uniform from the apex
    side = torch.randint(0, 4, (n,), generator=g)
    edge = (a - 0.5) * base * t
    out = base / 2 * t
    x = torch.where(side % 2 == 0, edge, torch.where(side == 1, out, -out))
    z = torch.where(side % 2 == 1, edge, torch.where(side == 0, out, -out))
    y = h / 2 - h * t
    bx, bz = (torch.rand(n, generator=g) - 0.5) * base, (torch.rand(n, generator=g) - 0.5) * base
    return torch.stack(
        [torch.where(on_base, bx, x), torch.where(on_base, torch.full((n,), -h / 2), y), torch.where(on_base, bz, z)],
        dim=1,
    )


def helix(n: int, g: torch.Generator, r: float = 0.6, h: float = 1.6, turns: float = 2.5) -> torch.Tensor:
    t = torch.rand(n, generator=g)
    angle = 2 * math.pi * turns * t
    tube = sphere(n, g, 0.08)
    return torch.stack([r * angle.cos(), h * (t - 0.5), r * angle.sin()], dim=1) + tube


def shifted(points: torch.Tensor, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> torch.Tensor:
    return points + torch.tensor([x, y, z])


def sideways(points: torch.Tensor) -> torch.Tensor:
    """Lay a y-axis shape along x."""
    return points[:, [1, 0, 2]]


# -- the classes: each draws its own proportions per sample --------------------------------------------------
def _capsule(n: int, g: torch.Generator) -> torch.Tensor:
    r, h = float(_u(g, 0.3, 0.45)), float(_u(g, 0.8, 1.2))
    a, b, c = _shares(n, [2 * h, r, r])
    cap = hemisphere(b, g, r)
    return torch.cat([cylinder(a, g, r, h, caps=False), shifted(cap, y=h / 2),
                      shifted(hemisphere(c, g, r) * torch.tensor([1.0, -1.0, 1.0]), y=-h / 2)])  # fmt: skip


def _cross(n: int, g: torch.Generator) -> torch.Tensor:
    w, length = float(_u(g, 0.18, 0.28)), float(_u(g, 1.4, 1.8))
    parts = _shares(n, [1, 1, 1])
    return torch.cat([box(parts[0], g, (length, w, w)), box(parts[1], g, (w, length, w)),
                      box(parts[2], g, (w, w, length))])  # fmt: skip


def _snowman(n: int, g: torch.Generator) -> torch.Tensor:
    big, small = float(_u(g, 0.45, 0.55)), float(_u(g, 0.28, 0.36))
    a, b = _shares(n, [big**2, small**2])
    return torch.cat([shifted(sphere(a, g, big), y=-big / 2), shifted(sphere(b, g, small), y=big / 2 + small * 0.8)])


def _dumbbell(n: int, g: torch.Generator) -> torch.Tensor:
    r, length = float(_u(g, 0.25, 0.35)), float(_u(g, 0.9, 1.3))
    a, b, c = _shares(n, [r * r, r * r, 0.05 * length])
    bar = sideways(cylinder(c, g, 0.07, length))
    return torch.cat([shifted(sphere(a, g, r), x=-length / 2), shifted(sphere(b, g, r), x=length / 2), bar])


def _table(n: int, g: torch.Generator) -> torch.Tensor:
    w, d, h = float(_u(g, 1.2, 1.6)), float(_u(g, 0.7, 1.0)), float(_u(g, 0.6, 0.9))
    counts = _shares(n, [w * d, 0.1, 0.1, 0.1, 0.1])
    top = shifted(box(counts[0], g, (w, 0.08, d)), y=h / 2)
    legs = [
        shifted(cylinder(k, g, 0.05, h), x=sx * (w / 2 - 0.1), z=sz * (d / 2 - 0.1))
        for k, (sx, sz) in zip(counts[1:], [(1, 1), (1, -1), (-1, 1), (-1, -1)], strict=True)
    ]
    return torch.cat([top, *legs])


def _snowman3(n: int, g: torch.Generator) -> torch.Tensor:
    radii = sorted(_u(g, 0.22, 0.45, 3).tolist(), reverse=True)
    counts = _shares(n, [r * r for r in radii])
    y, parts = 0.0, []
    for k, r in zip(counts, radii, strict=True):
        parts.append(shifted(sphere(k, g, r), y=y + r))
        y += 1.7 * r
    return torch.cat(parts)


def _stool(n: int, g: torch.Generator) -> torch.Tensor:
    r, h = float(_u(g, 0.35, 0.5)), float(_u(g, 0.8, 1.1))
    counts = _shares(n, [r * r * 3, 0.1, 0.1, 0.1])
    top = shifted(cylinder(counts[0], g, r, 0.08), y=h / 2)
    legs = [
        shifted(cylinder(k, g, 0.04, h), x=0.8 * r * math.cos(a), z=0.8 * r * math.sin(a))
        for k, a in zip(counts[1:], (0.0, 2 * math.pi / 3, 4 * math.pi / 3), strict=True)
    ]
    return torch.cat([top, *legs])


def _lamp(n: int, g: torch.Generator) -> torch.Tensor:
    stem, shade = float(_u(g, 0.9, 1.3)), float(_u(g, 0.4, 0.6))
    a, b, c = _shares(n, [shade, 0.2 * stem, 0.4])
    head = shifted(cone(a, g, shade, shade * 0.8), y=stem / 2)
    return torch.cat([head, cylinder(b, g, 0.05, stem), shifted(cylinder(c, g, 0.4, 0.06), y=-stem / 2)])


def _mushroom(n: int, g: torch.Generator) -> torch.Tensor:
    r, stem = float(_u(g, 0.55, 0.75)), float(_u(g, 0.5, 0.8))
    a, b = _shares(n, [r * r, 0.3 * stem])
    return torch.cat([shifted(hemisphere(a, g, r), y=0.0), shifted(cylinder(b, g, r * 0.3, stem), y=-stem / 2)])


def _arrow(n: int, g: torch.Generator) -> torch.Tensor:
    shaft, head = float(_u(g, 1.0, 1.4)), float(_u(g, 0.35, 0.5))
    a, b = _shares(n, [0.4 * shaft, head])
    return torch.cat([cylinder(a, g, 0.08, shaft), shifted(cone(b, g, head * 0.6, head), y=shaft / 2 + head / 2)])


def _chair(n: int, g: torch.Generator) -> torch.Tensor:
    s, back, leg = float(_u(g, 0.7, 0.9)), float(_u(g, 0.6, 0.9)), float(_u(g, 0.5, 0.7))
    counts = _shares(n, [s * s, s * back, 0.08, 0.08, 0.08, 0.08])
    seat = box(counts[0], g, (s, 0.08, s))
    rest = shifted(box(counts[1], g, (s, back, 0.08)), y=back / 2, z=-s / 2)
    legs = [
        shifted(cylinder(k, g, 0.04, leg), x=sx * (s / 2 - 0.06), y=-leg / 2, z=sz * (s / 2 - 0.06))
        for k, (sx, sz) in zip(counts[2:], [(1, 1), (1, -1), (-1, 1), (-1, -1)], strict=True)
    ]
    return torch.cat([seat, rest, *legs])


UPSTREAM: dict[str, Part] = {
    "sphere": lambda n, g: sphere(n, g, 1.0, tuple(_u(g, 0.8, 1.2, 3).tolist())),
    "cube": lambda n, g: box(n, g, tuple(_u(g, 0.8, 1.2, 3).tolist())),
    "cylinder": lambda n, g: cylinder(n, g, float(_u(g, 0.35, 0.55)), float(_u(g, 1.0, 1.6))),
    "cone": lambda n, g: cone(n, g, float(_u(g, 0.5, 0.7)), float(_u(g, 1.0, 1.4))),
    "torus": lambda n, g: torus(n, g, float(_u(g, 0.6, 0.8)), float(_u(g, 0.15, 0.3))),
    "pyramid": lambda n, g: pyramid(n, g, float(_u(g, 1.0, 1.4)), float(_u(g, 0.8, 1.2))),
    "disc": lambda n, g: cylinder(n, g, float(_u(g, 0.8, 1.0)), float(_u(g, 0.05, 0.12))),
    "helix": lambda n, g: helix(n, g, float(_u(g, 0.5, 0.7)), float(_u(g, 1.3, 1.8)), float(_u(g, 2.0, 3.0))),
    "cross": _cross,
    "capsule": _capsule,
}
DOWNSTREAM: dict[str, Part] = {
    "snowman": _snowman,
    "snowman3": _snowman3,
    "dumbbell": _dumbbell,
    "table": _table,
    "stool": _stool,
    "chair": _chair,
    "mushroom": _mushroom,
    "lamp": _lamp,
    "arrow": _arrow,
}
TASKS = {"upstream": UPSTREAM, "downstream": DOWNSTREAM}


def occlude(p: torch.Tensor, g: torch.Generator, keep: float) -> torch.Tensor:
    """Cut away the points beyond a random plane so that a share `keep` remains, then resample back to the
    cloud's size (a one-sided scan, as ScanObjectNN's partial objects)."""
    normal = torch.randn(3, generator=g)
    depth = p @ (normal / normal.norm())
    kept = p[depth <= depth.quantile(keep)]
    return kept[torch.randint(0, len(kept), (len(p),), generator=g)]


def make_shape(part: Part, num_points: int, g: torch.Generator, noise: float = 0.03, keep: float = 0.7,
               lying: bool = False) -> torch.Tensor:  # fmt: skip
    """One cloud of class `part`: sampled, partly occluded (a random share in [keep, 1] remains), laid on its
    side (`lying`: up becomes x), rotated about y, scaled per axis, jittered, in the unit sphere."""
    p = part(num_points, g)
    p = occlude(p, g, float(_u(g, keep, 1.0)))
    if lying:
        p = sideways(p)
    angle = float(_u(g, -math.pi, math.pi))
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    p = (p @ rot.T) * _u(g, 0.85, 1.15, 3) + noise * torch.randn(p.shape, generator=g)
    p = p - p.mean(0)
    return p / p.norm(dim=1).max().clamp_min(1e-8)


def shapes_arrays(task: str, per_class: int, num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clouds [C * per_class, num_points, 3] float32, labels) of a task, a function of the seed alone."""
    if task not in TASKS:
        raise ValueError(f"unknown shapes task {task!r}; tasks: {', '.join(TASKS)}")
    g = torch.Generator().manual_seed(seed)
    clouds, labels = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: thread start-up costs ~100x the work on a busy CPU
    try:
        for label, part in enumerate(TASKS[task].values()):
            for _ in range(per_class):
                clouds.append(make_shape(part, num_points, g, lying=task == "downstream"))
                labels.append(label)
    finally:
        torch.set_num_threads(threads)
    if not clouds:
        return np.zeros((0, num_points, 3), np.float32), np.zeros(0, np.int64)
    return torch.stack(clouds).numpy().astype(np.float32), np.asarray(labels, dtype=np.int64)


class ShapesDataModule(SplitLoaders, pl.LightningDataModule):
    """The shapes quickstart's data: `task` "upstream" (10 primitives) or "downstream" (9 composed objects).

    Args:
        task: which class set.
        train_per_class, val_per_class, test_per_class: clouds per class and split, each split drawn from
            its own seed stream (disjoint by construction).
        num_points: points per cloud.
        batch_size, num_workers: loaders.
        seed: generation and training order.
        shots: keep k training clouds per class of the generated training split (few-shot); val and test are
            unchanged. k may not exceed `train_per_class`.
        shot_seed: the seed of that subset (default `seed + 1`); vary it alone for k-shot runs over seeds on the
            same val / test splits.
    """

    point_channels = 3  # xyz

    def __init__(
        self,
        task: str = "downstream",
        train_per_class: int = 20,
        val_per_class: int = 20,
        test_per_class: int = 50,
        num_points: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        shots: int | None = None,
        shot_seed: int | None = None,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown shapes task {task!r}; tasks: {', '.join(TASKS)}")
        if shots is not None and not 1 <= shots <= train_per_class:
            raise ValueError(f"shots must be in [1, train_per_class={train_per_class}] clouds per class, got {shots}")
        self.shots, self.shot_seed = shots, seed + 1 if shot_seed is None else shot_seed
        self.task, self.num_points, self.batch_size, self.num_workers, self.seed = (
            task, num_points, batch_size, num_workers, seed
        )  # fmt: skip
        self.per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        self.class_names = list(TASKS[task])
        self.num_classes = len(self.class_names)
        self.datasets: dict[str, PointClouds] = {}

    def setup(self, stage: str | None = None) -> None:
        for offset, split in enumerate(("train", "val", "test")):
            if split not in self.datasets:
                # one stream per (task, split): changing a split's size never changes another split
                stream = self.seed * 1000 + offset * 10 + list(TASKS).index(self.task)
                clouds, labels = shapes_arrays(self.task, self.per_class[split], self.num_points, stream)
                if split == "train" and self.shots:  # few-shot: k of the generated training clouds per class
                    keep = k_shot_indices(labels.tolist(), self.shots, self.shot_seed)
                    clouds, labels = clouds[keep], labels[keep]
                # training shuffles the point order each epoch, so FPS (which starts at the first point) picks
                # other centres, as in the papers' training
                shuffle = RandomSubset(self.num_points, self.num_points) if split == "train" else None
                self.datasets[split] = PointClouds(torch.from_numpy(clouds), torch.from_numpy(labels), self.num_points,
                                                   shuffle)  # fmt: skip

    def data_identity(self) -> str:
        """Which clouds the training split holds, for derived state built from it (Point-PEFT's memory bank)."""
        shots = f", {self.shots} shots (seed {self.shot_seed})" if self.shots else ""
        return (f"ShapesDataModule {self.task}: {self.per_class['train']} per class, {self.num_points} points, "
                f"seed {self.seed}{shots}")  # fmt: skip

    def training_clouds(self, batch_size: int) -> DataLoader:
        """The training clouds in their generated order, without the per-epoch shuffle of their points."""
        self.setup()
        train = self.datasets["train"]
        return split_loader(PointClouds(train.points, train.labels, self.num_points), batch_size, shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return split_loader(self.datasets[split], self.batch_size, shuffle, self.seed, num_workers=self.num_workers)
