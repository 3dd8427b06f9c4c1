"""`python -m mmpeft.quickstart --task digits-diffusion | digits-personalize`: the diffusion quickstarts' tables (the
mean ± sample std over seeds, then each seed) and grids (seed 0's samples), written under experiments/transfer/."""

from __future__ import annotations

import argparse
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpeft.lab import records

__all__ = ["DIFFUSION_TASKS", "diffusion_main", "over_seeds"]

DIFFUSION_TASKS = ("digits-diffusion", "digits-personalize", "digits-efficientdm")
PER_CLASS = 20
SEEDS = [0, 1, 2]


def over_seeds(per_seed: Sequence[dict[str, dict[str, Any]]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> {key: mean over seeds, key_std: sample std (0 for one seed), key_all: per seed} for `keys`, with
    the trainable count and the mean seconds of a run."""
    out = {}
    for label in per_seed[0]:
        runs = [results[label] for results in per_seed]
        row: dict[str, Any] = {"trainable": runs[0]["trainable"],
                               "seconds": round(statistics.fmean(r["seconds"] for r in runs), 1)}  # fmt: skip
        for key in keys:
            values = [r[key] for r in runs]
            row[key], row[f"{key}_std"] = records.mean_std(values)
            row[f"{key}_all"] = values
        out[label] = row
    return out


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    values = row[f"{key}_all"]
    if len(values) == 1:
        return f"{row[key]:.{digits}f}"
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f} ({each})"


def _write(paths: list[Path], title: str, explain: str, columns: list[tuple[str, str, int]],
           results: dict[str, dict[str, Any]], command: str, seeds: Sequence[int]) -> None:  # fmt: skip
    """The markdown table: a row per run; `columns` are (header, key, decimals)."""
    header = "| run | " + " | ".join(h for h, _, _ in columns) + " | trainable | seconds per seed |"
    lines = [
        f"# {title}", "", f"{records.made_with(command)}.", "",
        f"{explain} Seeds {', '.join(map(str, seeds))}: mean ± sample std, then each seed (the seed draws the "
        f"scorer's and the run's initialisation and noise; the pretrained backbone is the same). Grid: "
        f"{paths[1].name} (seed 0).", "",
        header, "|" + "---|" * (len(columns) + 3),
        *(f"| {label} | " + " | ".join(_cell(r, key, d) for _, key, d in columns)
          + f" | {r['trainable']:,} | {r['seconds']} |" for label, r in results.items()),
    ]  # fmt: skip
    paths[0].write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(results) - 2 :]))


def diffusion_main(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """The table and the grid of `args.task` (one of `DIFFUSION_TASKS`) over `args.seeds` (default 0, 1, 2)."""
    from mmpeft.lab.diffusion_transfer import write_grid

    command = shlex.join(["python", "-m", "mmpeft.quickstart", *argv])
    if args.task == "digits-efficientdm":  # one seed; `--epochs` is the number of distillation paths
        from mmpeft.lab.efficientdm_eval import efficientdm_main

        efficientdm_main(args, command)
        return
    out = Path(args.out_dir)
    paths = [out / f"{args.task}.md", out / f"{args.task}.png"]
    try:
        records.refuse_overwrite(paths, args.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}") from None
    seeds = args.seeds or SEEDS
    if args.task == "digits-diffusion":
        from mmpeft.lab.diffusion_transfer import diffusion_transfer

        runs = [diffusion_transfer(args.epochs or 120, per_class=PER_CLASS, seed=s) for s in seeds]
        results = over_seeds([r for r, _ in runs], ["fid", "cond_acc"])
        _write(paths, "digits-diffusion: a pixel DiT pretrained on upright digits, fine-tuned to rotated ones",
               "FID in the features of a CNN trained on real rotated digits (lower is better) against the real "
               "rotated test digits, and the share of samples that CNN classifies as their conditioning digit; "
               f"{PER_CLASS} samples per digit, DDIM 50 steps, guidance 2. Frozen: the pretrained model as it is "
               "(it draws upright digits).",
               [("FID", "fid", 1), ("conditional accuracy", "cond_acc", 3)], results, command, seeds)  # fmt: skip
        grid = write_grid(runs[0][1], PER_CLASS, paths[1])
    else:
        from mmpeft.lab.diffusion_personalize import NEW_CLASS, STYLE_DIGIT, diffusion_personalize

        work = Path(args.runs_dir or "runs/digits-personalize")
        runs = [diffusion_personalize(work / f"seed{s}", args.epochs, per_class=PER_CLASS, seed=s)
                for s in seeds]  # fmt: skip
        results = over_seeds([r for r, _ in runs], ["style", "kept"])
        _write(paths, f"digits-personalize: a new class {NEW_CLASS} from five rotated {STYLE_DIGIT}s (DreamBooth on "
               "the digits DiT)",
               f"`configs/diffusion/digits_personalize.yaml`. Style: the share of class-{NEW_CLASS} samples a CNN "
               f"trained on real rotated digits calls a {STYLE_DIGIT}; kept: the conditional accuracy of the digits "
               "0-9's samples under a CNN trained on real upright digits (what prior preservation protects); "
               f"{PER_CLASS} samples per class, DDIM 25 steps, guidance 2. Frozen: the pretrained model with the "
               f"grown class table (row {NEW_CLASS} starts as a copy of row {STYLE_DIGIT}: DreamBooth's class noun).",
               [("style", "style", 3), ("kept", "kept", 3)], results, command, seeds)  # fmt: skip
        grid = write_grid(runs[0][1], PER_CLASS, paths[1], classes=NEW_CLASS + 1)
    print(f"wrote {paths[0]} and {grid}")
