"""The quickstart transfer tables in fp32 and in bf16 with frozen weights in bf16, 3 seeds each (issue 29's
"quickstart accuracies within the seed spread of fp32 on every row").

bf16 here is what a user gets from `--trainer.precision bf16-mixed --model.init_args.frozen_dtype bfloat16`;
full fine-tuning and training from scratch update every weight, refuse `frozen_dtype`, and run in plain
bf16-mixed. Writes `<task>.md` beside this file: per row the fp32 and bf16 mean ± std (sample std) over the seeds
and whether the bf16 mean lies within one fp32 standard deviation of the fp32 mean.

    python experiments/bf16_quickstart/run.py --task digits --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from mmpeft.lab import records
from mmpeft.lab.transfer import QUICKSTARTS, transfer_table

TRAINS_EVERY_WEIGHT = ("full fine-tuning", "from scratch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="digits", choices=sorted(QUICKSTARTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", default=None, help="comma-separated rows (default: the task's whole table)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = args.labels.split(",") if args.labels else list(QUICKSTARTS[args.task][1])
    runs = f"/tmp/mmpeft-bf16-quickstart/{args.task}"
    fp32 = transfer_table(runs_dir=f"{runs}/fp32", labels=labels, task=args.task, seeds=seeds)
    bf16 = {}
    for label in labels:
        extra = [] if label in TRAINS_EVERY_WEIGHT else ["--model.init_args.frozen_dtype=bfloat16"]
        bf16.update(transfer_table(runs_dir=f"{runs}/bf16", labels=[label], task=args.task, seeds=seeds,
                                   precision="bf16-mixed", extra=extra))  # fmt: skip
    command = "python experiments/bf16_quickstart/run.py " + " ".join(sys.argv[1:])
    lines = [
        f"# The {args.task} quickstart in fp32 and in bf16 (frozen weights in bf16), {len(seeds)} seeds",
        "",
        f"{records.made_with(command)}; cpu {platform.processor() or platform.machine()}, threads 2.",
        "",
        "Test accuracy (%), mean ± sample std over seeds " + ", ".join(map(str, seeds)) + ". bf16: "
        "`--trainer.precision bf16-mixed --model.init_args.frozen_dtype bfloat16` (full fine-tuning and scratch: "
        "bf16-mixed only; they refuse frozen_dtype). Within: |bf16 mean - fp32 mean| <= fp32 std.",
        "",
        "| run | fp32 | bf16 | difference | within one fp32 std |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        a, b = fp32[label], bf16[label]
        diff = 100 * (b["test_acc"] - a["test_acc"])
        within = abs(diff) <= 100 * a["test_acc_std"]
        lines.append(f"| {label} | {100 * a['test_acc']:.1f} ± {100 * a['test_acc_std']:.1f} | "
                     f"{100 * b['test_acc']:.1f} ± {100 * b['test_acc_std']:.1f} | {diff:+.1f} | "
                     f"{'yes' if within else 'no'} |")  # fmt: skip
    out = Path(__file__).with_name(f"{args.task}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
