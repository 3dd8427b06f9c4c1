"""The cells of a sweep: stage 1 (every grid point on val), the selection per (task, method), stage 2 (the
selected point, retrained and tested once)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmpeft.lab.results import metric_value
from mmpeft.lab.sweep.spec import Cell, Sweep, config_fingerprint, referred_files


def grid(search: Mapping[str, list]) -> list[dict[str, Any]]:
    keys = list(search)
    return [dict(zip(keys, values)) for values in itertools.product(*(search[k] for k in keys))] or [{}]


def cell_args(sweep: Sweep, stage: int, task: str, seed: int, point: dict, fixed: dict) -> dict[str, Any]:
    args = {**fixed, **point}
    if sweep.task_key is not None:
        args[sweep.task_key] = task
    if sweep.protocol_key is not None:
        args[sweep.protocol_key] = sweep.protocols[stage - 1]
    args["seed_everything"] = seed
    args.update(dict.fromkeys(sweep.seed_keys, seed))
    if sweep.data_root is not None:
        args[sweep.root_key] = sweep.data_root
    return args


def fingerprints(sweep: Sweep) -> dict[str, str]:
    """Each method's config fingerprint, read once per plan (a config edited between stages is seen)."""
    return {method: config_fingerprint(sweep.configs(method)) for method in sweep.methods}


def make_cell(
    sweep: Sweep, prints: dict, stage: int, task: str, method: str, seed: int, point: dict, fixed: dict
) -> Cell:
    args = cell_args(sweep, stage, task, seed, point, fixed)
    fingerprint = prints[method]
    referred = referred_files(args, Path.cwd(), set())  # an override naming a config file: its content counts
    if referred:
        fingerprint += "+" + config_fingerprint(referred)
    return Cell(stage, task, method, seed, point, args, sweep.configs(method), fingerprint)


def plan_stage1(sweep: Sweep) -> list[Cell]:
    """Every search point on the tuning split, first seed; (task, method) pairs with one point skip it."""
    cells, prints = [], fingerprints(sweep)
    for task, method in itertools.product(sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        points = grid(search)
        if len(points) > 1:
            cells += [make_cell(sweep, prints, 1, task, method, sweep.seeds[0], p, fixed) for p in points]
    return cells


def _score(result: Mapping[str, Any], metric: str, mode: str) -> float:
    """Higher is better in both modes; NaN (a diverged run) ranks below every number."""
    value = metric_value(result, metric)
    if math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def select(
    results: list[dict[str, Any]], metric: str = "val/acc", mode: str = "max"
) -> dict[tuple[str, str], dict[str, Any]]:
    """Best point per (task, method): highest `metric` (mode max) or lowest (min); ties keep the earlier result.

    `plan_stage2` passes the results in grid order, so there a tie goes to the earlier grid point."""
    best: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for r in results:
        key, score = (r["task"], r["method"]), _score(r, metric, mode)
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    return {key: r for key, (_, r) in best.items()}


def in_grid_order(sweep: Sweep, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage-1 results sorted by their point's place in the current grid of their (task, method).

    The sort is what makes a tie go to the first grid point whatever order the results arrive in (finishing
    order, resumed cells, a grid reordered since an earlier run); a point no longer in the grid sorts last."""
    grids: dict[tuple[str, str], list[dict]] = {}

    def rank(r: dict[str, Any]) -> int:
        key = (r["task"], r["method"])
        if key not in grids:
            grids[key] = grid(sweep.settings(*key)[0]) if r["method"] in sweep.methods else []
        points = grids[key]
        return points.index(r["point"]) if r["point"] in points else len(points)

    return sorted(results, key=rank)


def plan_stage2(sweep: Sweep, stage1: list[dict[str, Any]], tasks: list[str] | None = None) -> list[Cell]:
    """The stage-2 cells of `tasks` (all by default): each (task, method) at its selected point, every seed.
    A launcher plans one task as soon as its stage-1 cells are done (`stage1` then holds that task's)."""
    chosen = select(in_grid_order(sweep, stage1), sweep.select["metric"], sweep.select["mode"])
    cells, prints = [], fingerprints(sweep)
    for task, method in itertools.product(tasks if tasks is not None else sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        point = chosen[(task, method)]["point"] if (task, method) in chosen else grid(search)[0]
        cells += [make_cell(sweep, prints, 2, task, method, seed, point, fixed) for seed in sweep.seeds]
    return cells
