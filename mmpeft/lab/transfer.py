"""The transfers behind the quickstarts: each method's downstream test accuracy from one config.

`python -m mmpeft.quickstart` (digits) and `python -m mmpeft.quickstart --task shapes` (point clouds)
print the tables in the README (random-weights probe, linear probe, PEFT methods, full fine-tuning,
training from scratch); tests run them on a reduced budget to check that each quickstart is a real
transfer.

`--shots 5,20 --seeds 0,1,2` makes the few-shot transfer table instead. It is a sweep with one grid point per
method, `experiments/transfer/<task>-kshot.yaml` (`mmpeft sweep` runs the same file): every method (`--methods`
picks some) trained on k downstream examples per class, drawn with each seed (the same val and test splits for
every subset), tested once at the end of training. The cells run through the sweep runner (checked first, one
`mmpeft fit` each, resumable); the table goes to `experiments/transfer/<task>-kshot[-<precision>].csv` and `.md`
(test accuracy mean ± std over the seeds, in percent, and trainable parameters; the md's header names the command,
precision, versions and date), never replacing existing result files without `--overwrite`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmpeft.lab import records
from mmpeft.lab.diffusion_quickstart import DIFFUSION_TASKS, diffusion_main
from mmpeft.lab.results import metric_value
from mmpeft.lab.sweep.checks import check_sweep
from mmpeft.lab.sweep.plan import plan_stage2
from mmpeft.lab.sweep.run import Runner
from mmpeft.lab.sweep.spec import Sweep, load_sweep

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CONFIG = CONFIGS / "quickstart.yaml"

# label -> (method spec, pretrained backbone?, learning rate[, the row's own config instead of the task's])
RUNS: dict[str, tuple[Any, ...]] = {
    "linear probe, random weights": ("linear", False, 1e-2),
    "linear probe": ("linear", True, 1e-2),
    "bitfit": ("bitfit", True, 1e-2),
    "lora (quickstart)": (None, True, 3e-3),  # the config's own method
    "adapter": ({"name": "adapter", "bottleneck": 32, "scale": 1.0, "dropout": 0.0}, True, 3e-3),
    "full fine-tuning": ("full", True, 1e-3),
    "from scratch": ("full", False, 1e-3),
}
ANY2POINT_CONFIG = CONFIGS / "point" / "quickstart_any2point.yaml"  # the digits ViT as a 2-D source
SHAPES_RUNS: dict[str, tuple[Any, ...]] = {
    "linear probe, random weights": ("linear", False, 1e-2),
    "linear probe": ("linear", True, 1e-2),
    "bitfit": ("bitfit", True, 1e-2),
    "lora (quickstart)": (None, True, 1e-2),  # the config's lr, chosen on val from {1e-3, 3e-3, 1e-2}
    "adapter": ({"name": "adapter", "bottleneck": 16, "scale": 1.0, "dropout": 0.0}, True, 3e-3),
    # chosen on val (seed 0) from {1e-3, 3e-3, 1e-2, 3e-2}: 0.861, 0.894, 0.900, 0.872; memory bank built first
    "point_peft": ({"name": "point_peft"}, True, 1e-2),
    "full fine-tuning": ("full", True, 1e-3),
    "from scratch": ("full", False, 1e-3),
    # Any2Point on the digits ViT: lr chosen on val (seed 0) from {1e-3, 3e-3, 1e-2}
    # (val 0.800 / 0.878 / 0.867); the same run on a random-weights ViT measures what the cross-modal transfer brings,
    # and the linear probe on the same backbone (its tokenizer, [cls] and final norm still train) what the adapter does
    "any2point (digits ViT)": (None, True, 3e-3, ANY2POINT_CONFIG),
    "any2point (random-weights ViT)": (None, False, 3e-3, ANY2POINT_CONFIG),
    "any2point backbone, linear probe (digits ViT)": ("linear", True, 3e-3, ANY2POINT_CONFIG),
}
# task -> the run seeds of its full table by default: the shapes table is a mean ± std over seeds (single runs of 450
# test clouds move by about a point with the seed or the thread count); digits keeps its one-seed table
TABLE_SEEDS: dict[str, list[int]] = {"digits": [0], "shapes": [0, 1, 2]}
# task -> (config, runs)
QUICKSTARTS: dict[str, tuple[Path, dict[str, tuple[Any, ...]]]] = {
    "digits": (CONFIG, RUNS),
    "shapes": (CONFIGS / "point" / "quickstart.yaml", SHAPES_RUNS),
}


def run_one(method: Any, pretrained: bool, lr: float, epochs: int, runs_dir: str, name: str,
            pretrain_epochs: int | None = None, seed: int = 0, config: Path = CONFIG, shots: int | None = None,
            precision: str = "32", extra: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Fit on the downstream split, then test once; returns accuracies and the trainable count.

    `shots`: train on k examples per class of the downstream training split, drawn with `seed` (the data
    module's `shot_seed`; its split seed stays the config's, so val and test do not change with `seed`).
    `extra`: further command-line options (e.g. data options), last, so they win."""
    from mmpeft.core.report import parameter_report
    from mmpeft.lab.lightning_cli import run_cli

    args = [
        f"--config={config}", f"--seed_everything={seed}", f"--model.init_args.lr={lr}",
        f"--model.init_args.backbone.init_args.pretrained={str(pretrained).lower()}",
        f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false", f"--run.dir={runs_dir}",
        f"--run.name={name}", "--run.wandb=disabled", "--run.test_after_fit=false", f"--trainer.precision={precision}",
    ]  # fmt: skip
    if shots is not None:
        args += [f"--data.init_args.shots={shots}", f"--data.init_args.shot_seed={seed}"]
    if method is not None:
        args.append(f"--model.init_args.method={method if isinstance(method, str) else json.dumps(method)}")
    if pretrain_epochs:
        args.append(f"--model.init_args.backbone.init_args.epochs={pretrain_epochs}")
    cli = run_cli([*args, *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    val = float(cli.trainer.callback_metrics["val/acc"])
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    return {"val_acc": val, "test_acc": float(test), "trainable": parameter_report(cli.model.model).trainable}


def transfer_table(epochs: int = 30, runs_dir: str = "runs/transfer", labels: list[str] | None = None,
                   pretrain_epochs: int | None = None, task: str = "digits", precision: str = "32",
                   seeds: Sequence[int] = (0,), extra: Sequence[str] = ()) -> dict[str, dict[str, Any]]:  # fmt: skip
    """label -> test / val accuracy (the mean over `seeds`), `test_acc_std` (sample std, 0 for one seed),
    `test_accs` (per seed), trainable count and seconds. A seed seeds the run (the head's and the method's
    initialisation, the training augmentation); the data splits and the pretrained backbone stay the same.
    `extra`: command-line options for every run (`run_one`)."""
    config, runs = QUICKSTARTS[task]
    results = {}
    for label in labels or list(runs):
        method, pretrained, lr, *own_config = runs[label]
        start = time.perf_counter()
        name = label.replace(" ", "_").replace(",", "")
        per_seed = [run_one(method, pretrained, lr, epochs, runs_dir, f"{name}-seed{seed}" if len(seeds) > 1 else name,
                            None if own_config else pretrain_epochs,  # another backbone: its own pretraining
                            seed=seed, config=own_config[0] if own_config else config,
                            precision=precision, extra=extra)
                    for seed in seeds]  # fmt: skip
        tests = [r["test_acc"] for r in per_seed]
        mean, std = records.mean_std(tests)
        results[label] = {
            "test_acc": mean, "test_acc_std": std,
            "test_accs": tests, "val_acc": statistics.fmean(r["val_acc"] for r in per_seed),
            "trainable": per_seed[0]["trainable"], "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
    return results


# -- few-shot tables ------------------------------------------------------------------------------------------
OUT_DIR = Path("experiments") / "transfer"
# task -> its k-shot table as a sweep file (methods, learning rates, data options, seeds): the one source of both
# `python -m mmpeft.quickstart --shots` and `mmpeft sweep`
KSHOT_SWEEPS: dict[str, Path] = {task: REPO / "experiments" / "transfer" / f"{task}-kshot.yaml" for task in QUICKSTARTS}
LR_CHOICE = (
    "Learning rates: the quickstart's per-method values where it has the method (not re-tuned for k shots); "
    "for VPT, SSF, MoSA and VL-PET chosen on val (seed 0, the mean of the k=5 and k=20 val accuracies after the "
    "last epoch) from {1e-3, 3e-3, 1e-2, 3e-2}, extended by 1e-1, then 3e-1, while the largest value won (ties: "
    "the smaller lr); the test split chose nothing."
)
# task -> how the data differ from the quickstart's (the md says it)
KSHOT_NOTES: dict[str, str] = {
    "digits": "The downstream pool is split 55/20/25 (train/val/test: 300/108/134 images) instead of the "
    "quickstart's 50/20/30, the smallest training share holding 20 images of every digit (digit 6 has 36 in the "
    "pool); the k-shot subsets are drawn from those 300. " + LR_CHOICE,
    "shapes": "The k-shot subsets are drawn from the quickstart's 30 training clouds per class (val 20 and test "
    "50 per class, 180 and 450 clouds). " + LR_CHOICE,
}
ORDER = ["random_probe", "linear", "bitfit", "lora", "adapter", "vpt", "ssf", "mosa", "vl_pet", "full", "scratch"]
LABELS = {
    "random_probe": "linear probe, random weights",
    "linear": "linear probe",
    "bitfit": "BitFit",
    "lora": "LoRA r=8 on every linear (the quickstart's)",
    "adapter": "adapter (AdaptFormer)",
    "vpt": "VPT-shallow, 10 prompts",
    "ssf": "SSF",
    "mosa": "MoSA",
    "vl_pet": "VL-PET (large gates)",
    "full": "full fine-tuning",
    "scratch": "training from scratch",
}
CSV_COLUMNS = ["method", "shots", "seeds", "acc_mean", "acc_std", "trainable", "epochs", "precision",
               "lr", "test_accs", "val_acc_mean", "seconds"]  # fmt: skip


def kshot_runs(task: str) -> dict[str, tuple[Any, bool, float]]:
    """key -> (method spec, pretrained backbone?, learning rate) of every method of a task's k-shot sweep file (a
    spec of None: the quickstart config's own method)."""
    sweep = load_sweep(KSHOT_SWEEPS[task])
    runs = {}
    for key in sweep.methods:
        args = sweep.settings(sweep.tasks[0], key)[1]
        pretrained = args.get("model.init_args.backbone.init_args.pretrained", True)
        runs[key] = (args.get("model.init_args.method"), pretrained, args["model.init_args.lr"])
    return runs


def kshot_sweep(task: str, shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str] | None = None,
                epochs: int = 50, runs_dir: str | Path = "/tmp/mmpeft-kshot",
                precision: str = "32") -> Sweep:  # fmt: skip
    """The task's k-shot sweep file narrowed to these k, seeds, methods, epochs and precision (a task per k, named
    `k<k>`, whose rule sets `data.init_args.shots`); its cells land in `runs_dir/<table stem>/`."""
    sweep = load_sweep(KSHOT_SWEEPS[task])
    unknown = [m for m in methods or [] if m not in sweep.methods]
    if unknown:
        raise ValueError(f"unknown k-shot method(s) {unknown} for {task}; choose from {', '.join(sweep.methods)}")
    sweep.methods = {m: [str(REPO / f) for f in sweep.configs(m)] for m in methods or sweep.methods}
    sweep.tasks = [f"k{k}" for k in shots]
    rules = [r for r in sweep.overrides if "task" not in r]
    sweep.overrides = [{"task": f"k{k}", "args": {"data.init_args.shots": k}} for k in shots] + rules
    sweep.seeds = list(seeds)
    sweep.args = {**sweep.args, "trainer.max_epochs": epochs, "trainer.check_val_every_n_epoch": epochs,
                  "trainer.precision": precision}  # fmt: skip
    sweep.name, sweep.out = kshot_stem(task, precision), str(runs_dir)
    return sweep


def method_label(task: str, key: str, lr: float) -> str:
    """'adapter (AdaptFormer): bottleneck 32, scale 1.0, dropout 0.0; lr 0.003'."""
    method = kshot_runs(task).get(key, (None,))[0]
    options = method if isinstance(method, dict) else {}
    spec = ", ".join(f"{k} {v}" for k, v in options.items() if k != "name")
    return f"{LABELS.get(key, key)}{': ' + spec if spec else ''}; lr {lr:g}"


def kshot_stem(task: str, precision: str = "32") -> str:
    """`<task>-kshot`, with `-<precision>` unless it is full precision."""
    return f"{task}-kshot" if str(precision) in ("32", "32-true") else f"{task}-kshot-{precision}"


def kshot_paths(task: str, precision: str = "32", out_dir: str | Path = OUT_DIR) -> tuple[Path, Path]:
    stem = Path(out_dir) / kshot_stem(task, precision)
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def kshot_table(task: str, shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str] | None = None,
                epochs: int = 50, runs_dir: str = "/tmp/mmpeft-kshot", precision: str = "32",
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (method, k): test accuracy mean ± std (in %) over `seeds` and the trainable count, from the
    k-shot sweep (`kshot_sweep`) run by the sweep runner: checked before the first cell, one `mmpeft fit` per
    cell, and resumable (a rerun with the same `runs_dir` runs only the missing cells).

    Validation runs once, after the last epoch (nothing in training reads it, and evaluation draws nothing from
    the training RNG, so the model is the same as with validation every epoch, in a fraction of the time)."""
    sweep = kshot_sweep(task, shots, seeds, methods, epochs, runs_dir, precision)
    check_sweep(sweep, KSHOT_SWEEPS[task])
    runner = Runner(sweep, Path(sweep.out) / sweep.name, log)
    results = runner.run(plan_stage2(sweep, []), stage=2, metric="test/acc")
    if runner.failed:
        logs = runner.out / "logs"
        raise RuntimeError(f"{len(runner.failed)} k-shot cells failed (logs in {logs}): {runner.failed[:3]}")
    runs, rows = kshot_runs(task), []
    for key in sweep.methods:
        for k in shots:
            cells = sorted((r for r in results if r["method"] == key and r["task"] == f"k{k}"), key=lambda r: r["seed"])
            if len({r["trainable"] for r in cells}) != 1:
                raise RuntimeError(f"{key}: the trainable count changed across seeds: {cells}")
            accs = [100.0 * metric_value(r, "test/acc") for r in cells]
            acc_mean, acc_std = records.mean_std(accs)
            rows.append({
                "method": key, "shots": k, "seeds": ";".join(str(r["seed"]) for r in cells), "acc_mean": acc_mean,
                "acc_std": acc_std, "trainable": cells[0]["trainable"],
                "epochs": epochs, "precision": str(precision), "lr": runs[key][2],
                "test_accs": ";".join(f"{a:.2f}" for a in accs),
                "val_acc_mean": statistics.fmean(100.0 * metric_value(r, "val/acc") for r in cells),
                "seconds": round(sum(r.get("seconds", 0.0) for r in cells), 1),
            })  # fmt: skip
    return rows


def kshot_markdown(task: str, rows: Sequence[dict[str, Any]], command: str, precision: str = "32",
                   date: str | None = None, versions: str | None = None) -> str:  # fmt: skip
    """method | trainable | k=… acc mean ± std per k, under a header naming how the table was made."""
    shots = sorted({r["shots"] for r in rows})
    seeds = rows[0]["seeds"].split(";") if rows else []
    epochs = sorted({r["epochs"] for r in rows})
    by = {(r["method"], r["shots"]): r for r in rows}
    date = date or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines = [
        f"# {task}: k-shot transfer of the upstream-pretrained backbone",
        "",
        f"{records.made_with(command, versions, date)}; precision {precision}.",
        "",
        f"Downstream test accuracy (%), mean ± std (sample std) over {len(seeds)} seed(s) ({', '.join(seeds)}): "
        f"each seed draws the k training examples per class from the downstream training split (the val and "
        f"test splits are the same for every seed) and seeds the run; {'/'.join(map(str, epochs))} epochs, "
        f"the test split scored once after the last epoch. Trainable parameters include the head. "
        f"{KSHOT_NOTES.get(task, '')}",
        "",
        "| method | trainable | " + " | ".join(f"k={k} acc mean ± std" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for key in dict.fromkeys(r["method"] for r in rows):
        cells = [by.get((key, k)) for k in shots]
        first = next(c for c in cells if c)
        accs = [f"{c['acc_mean']:.2f} ± {c['acc_std']:.2f}" if c else "" for c in cells]
        lines.append(f"| {method_label(task, key, first['lr'])} | {first['trainable']:,} | {' | '.join(accs)} |")
    return "\n".join(lines) + "\n"


def write_kshot(task: str, rows: Sequence[dict[str, Any]], command: str, precision: str = "32",
                out_dir: str | Path = OUT_DIR, overwrite: bool = False) -> tuple[Path, Path]:  # fmt: skip
    csv_path, md_path = kshot_paths(task, precision, out_dir)
    records.refuse_overwrite((csv_path, md_path), overwrite)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "acc_mean": f"{r['acc_mean']:.2f}", "acc_std": f"{r['acc_std']:.2f}",
                             "val_acc_mean": f"{r['val_acc_mean']:.2f}"})  # fmt: skip
    md_path.write_text(kshot_markdown(task, rows, command, precision))
    return csv_path, md_path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*sorted(QUICKSTARTS), *DIFFUSION_TASKS], default="digits",
                        help="digits-diffusion / digits-personalize: the diffusion quickstarts "
                             "(mmpeft.lab.diffusion_transfer, mmpeft.lab.diffusion_personalize)")  # fmt: skip
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 30 (full data), 50 (--shots), 120 (digits-diffusion), 90 (digits-personalize)",
    )
    parser.add_argument(
        "--runs-dir",
        default=None,  # fmt: skip
        help="default: runs/transfer (digits), runs/transfer_shapes, runs/digits-personalize",
    )
    parser.add_argument("--shots", type=_ints, default=None, help="k-shot table: k per class, e.g. 5,20")
    parser.add_argument("--seeds", type=_ints, default=None,
                        help="run seeds (default 0,1,2; the digits table: 0)")  # fmt: skip
    parser.add_argument("--methods", default=None, help=f"k-shot table: comma-separated, of {','.join(ORDER)}")
    parser.add_argument("--precision", default="32", help="the trainer's precision (32, bf16-mixed, ...)")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="k-shot table: where the csv and md go")
    parser.add_argument("--overwrite", action="store_true", help="k-shot table: replace existing result files")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is much faster on a busy CPU")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the k-shot cells run as processes of their own
    if args.task in DIFFUSION_TASKS:
        diffusion_main(args, argv)
        return
    runs_dir = args.runs_dir or ("runs/transfer" if args.task == "digits" else f"runs/transfer_{args.task}")
    if args.shots:
        methods = args.methods.split(",") if args.methods else None
        unknown = sorted(set(methods or []) - set(kshot_runs(args.task)))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(kshot_runs(args.task))}")
        try:
            records.refuse_overwrite(kshot_paths(args.task, args.precision, args.out_dir), args.overwrite)
        except FileExistsError as e:
            parser.error(str(e))
        seeds = args.seeds or [0, 1, 2]
        rows = kshot_table(args.task, args.shots, seeds, methods, args.epochs or 50, runs_dir, args.precision)
        command = shlex.join(["python", "-m", "mmpeft.quickstart", *argv])
        for path in write_kshot(args.task, rows, command, args.precision, args.out_dir, args.overwrite):
            print(f"wrote {path}")
        print(kshot_markdown(args.task, rows, command, args.precision))
        return
    seeds = args.seeds or TABLE_SEEDS[args.task]
    results = transfer_table(args.epochs or 30, runs_dir, task=args.task, precision=args.precision, seeds=seeds)
    many = len(seeds) > 1
    print(
        f"seeds {', '.join(map(str, seeds))}" + ("; test acc: mean ± std (sample std), then per seed" if many else "")
    )
    print("| run | test acc | val acc | trainable | seconds |\n|---|---|---|---|---|")
    for label, r in results.items():
        test = f"{r['test_acc']:.3f}" + (f" ± {r['test_acc_std']:.3f} ({', '.join(f'{a:.3f}' for a in r['test_accs'])})"
                                          if many else "")  # fmt: skip
        print(f"| {label} | {test} | {r['val_acc']:.3f} | {r['trainable']:,} | {r['seconds']} |")


if __name__ == "__main__":
    main()
