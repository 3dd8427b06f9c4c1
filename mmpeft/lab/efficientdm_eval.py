"""EfficientDM on the digits DiT, measured: per bit-width, the PTQ model and the same model after data-free QALoRA
distillation, against the full-precision teacher.

    python -m mmpeft.quickstart --task digits-efficientdm      # experiments/transfer/digits-efficientdm.{md,png}

For W8A8, W4A8 and W4A4 (`BITS`): calibrate on the teacher's own trajectory (the PTQ model), measure the per-step
ε error against the teacher on fixed validation paths (100 DDIM steps, η = 1, guidance 1.5: the distillation's own
paths), sample and score, then distil (`EfficientDMDistillation`, the official rates and loss; `trajectories`
paths of 100 steps) and measure again. Samples: DDIM 50 steps, guidance 2, 20 per digit, scored by a CNN trained on
the real upright digits (the DiT's own upstream task): FID in its features against the real test digits and the
share classified as their conditioning digit (the digits-diffusion quickstart's scorer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BITS", "efficientdm_eval", "eps_errors", "write_error_plot"]

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
STEPS = 100  # the tables' schedule and the distillation paths (official)
VAL_SEEDS = (1_000_000, 1_000_001)


def distillation_task(w_bits: int, a_bits: int, rank: int = 32) -> Any:
    """The digits DiT under efficientdm at W`w_bits`A`a_bits`, in the distillation task, calibrated (the PTQ model)."""
    from mmpeft.backbones.digits_dit import DIGITS_SCHEDULE, DigitsDiT
    from mmpeft.tasks.quant_distillation import EfficientDMDistillation

    schedule = {k: v for k, v in DIGITS_SCHEDULE.items() if k != "prediction_type"}
    method = {"name": "efficientdm", "w_bits": w_bits, "a_bits": a_bits, "rank": rank, "steps": STEPS}
    task = EfficientDMDistillation(DigitsDiT(pretrained=True), method=method, pipeline=None, weight_decay=0.01,
                                   schedule="linear", **schedule)  # fmt: skip
    task.setup("fit")  # the PTQ pass on the teacher's trajectory
    return task


@torch.no_grad()
def eps_errors(task: Any, seeds: Sequence[int] = VAL_SEEDS) -> list[float]:
    """Per denoising step, the mean squared error of the student's guided ε against the teacher's, averaged over
    the validation paths `seeds` (each walked with the teacher's ε)."""
    was_training = task.model.training
    task.model.eval()
    task.method.use_schedule(task.model.backbone, None)
    per_step = torch.zeros(STEPS)
    for seed in seeds:
        path = task.teacher_trajectory(STEPS, task.batch, seed, task.eta, task.guidance_scale)
        while path.step < STEPS:
            teacher = path.teacher(task.model)
            per_step[path.step] += F.mse_loss(path.prediction(task.model), teacher).item() / len(seeds)
            path.advance(teacher)
    task.model.train(was_training)
    return per_step.tolist()


def distil(task: Any, trajectories: int, seed: int = 0) -> float:
    """`trajectories` paths of data-free distillation (Lightning, CPU); returns the wall seconds."""
    import pytorch_lightning as pl

    from mmpeft.data.trajectory import TrajectoryDataModule

    pl.seed_everything(seed, verbose=False)
    data = TrajectoryDataModule(trajectories=trajectories, steps=STEPS, val_trajectories=0, seed=seed)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    return time.perf_counter() - start


def _scored(model: Any, classifier: Any, real: torch.Tensor, per_class: int, seed: int) -> tuple[dict, torch.Tensor]:
    from mmpeft.lab.diffusion_transfer import sample_digits, score_digits

    images, labels = sample_digits(model, per_class, steps=50, guidance_scale=2.0, seed=seed)
    return score_digits(images, labels, classifier, real), images


def efficientdm_eval(trajectories: int = 32, per_class: int = 20, seed: int = 0, bits: Sequence[str] = tuple(BITS),
                     log: Callable[[str], None] = print) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """label -> {fid, cond_acc, eps_error, eps_per_step, seconds, trainable} for the teacher, and PTQ / QALoRA at each
    of `bits`; and each label's samples."""
    from mmpeft.backbones.digits_dit import DigitsDiT
    from mmpeft.core.model import PeftModel
    from mmpeft.core.report import parameter_report
    from mmpeft.data.digits import DigitsDataModule
    from mmpeft.lab.diffusion_transfer import digits_classifier

    classifier, acc = digits_classifier(seed=seed, task="upstream")
    log(f"scorer: a CNN trained on the real upright digits, test accuracy {acc:.3f}")
    data = DigitsDataModule("upstream", seed=seed, train_fraction=0.7, val_fraction=0.0, shift=0)
    data.setup("fit")
    real = data.splits["test"].images
    results, samples = {}, {}
    teacher = PeftModel(DigitsDiT(pretrained=True), "full").eval()
    scores, samples["full precision"] = _scored(teacher, classifier, real, per_class, seed)
    results["full precision"] = {**scores, "eps_error": 0.0, "eps_per_step": [0.0] * STEPS, "seconds": 0.0,
                                 "trainable": 0}  # fmt: skip
    log(f"full precision: FID {scores['fid']:.2f}, conditional accuracy {scores['cond_acc']:.3f}")
    for label in bits:
        w_bits, a_bits = BITS[label]
        torch.manual_seed(seed)
        task = distillation_task(w_bits, a_bits)
        for stage in ("PTQ", "QALoRA"):
            seconds = distil(task, trajectories, seed) if stage == "QALoRA" else 0.0
            errors = eps_errors(task)
            scores, images = _scored(task.model, classifier, real, per_class, seed)
            name = f"{label} {stage}"
            trainable = parameter_report(task.model).trainable if stage == "QALoRA" else 0
            results[name] = {**scores, "eps_error": sum(errors) / len(errors), "eps_per_step": errors,
                             "seconds": round(seconds, 1), "trainable": trainable}  # fmt: skip
            samples[name] = images
            log(f"{name}: eps error {results[name]['eps_error']:.5f}, FID {scores['fid']:.2f}, conditional accuracy "
                f"{scores['cond_acc']:.3f}" + (f", distilled in {seconds:.0f} s" if seconds else ""))  # fmt: skip
    return results, samples


def write_error_plot(results: dict[str, dict], path: str | Path) -> Path:
    """The per-step ε error against the teacher, PTQ (dashed) and after QALoRA (solid), one colour per bit-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, label in enumerate(b for b in BITS if f"{b} PTQ" in results):
        colour = f"C{i}"
        for stage, style in (("PTQ", "--"), ("QALoRA", "-")):
            ax.plot(results[f"{label} {stage}"]["eps_per_step"], style, color=colour, label=f"{label} {stage}")
    ax.set_yscale("log")
    ax.set_xlabel("DDIM step (0 = pure noise)")
    ax.set_ylabel("ε MSE against the teacher")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, dict], samples: dict[str, torch.Tensor], out: Path, command: str,
                 trajectories: int, per_class: int) -> list[Path]:  # fmt: skip
    """digits-efficientdm.md (the table), .png (seed 0's first sample per digit, a row per model) and -error.png."""
    from mmpeft.lab import records
    from mmpeft.lab.diffusion_transfer import write_grid

    md, grid, plot = out / "digits-efficientdm.md", out / "digits-efficientdm.png", out / "digits-efficientdm-error.png"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# digits-efficientdm: the digits DiT quantized (PTQ) and distilled data-free (EfficientDM QALoRA)", "",
        f"{records.made_with(command)}.", "",
        f"Distillation: {trajectories} teacher paths of {STEPS} DDIM steps (η 1, guidance 1.5, 2 classes each), one "
        f"AdamW step per denoising step ({trajectories * STEPS:,} updates; the official recipe: 160 paths, 16,000), "
        "LoRA rank 32 at mean(s_w)/2500 per layer, weight steps 1e-6, tables 5e-4, linear decay. ε error: the mean "
        f"over the {STEPS} steps of the squared error of the guided ε against the teacher's, on {len(VAL_SEEDS)} "
        f"fixed validation paths. Samples: DDIM 50 steps, guidance 2, {per_class} per digit, scored by a CNN trained "
        "on the real upright digits (FID in its features against the real test digits; conditional accuracy: the "
        f"share it classifies as their digit). Seed 0. Grid: {grid.name} (rows in table order); per-step error: "
        f"{plot.name}.", "",
        "| model | ε error vs teacher | FID | conditional accuracy | distillation seconds | trainable |",
        "|---|---|---|---|---|---|",
        *(f"| {label} | {r['eps_error']:.5f} | {r['fid']:.2f} | {r['cond_acc']:.3f} | {r['seconds'] or '-'} | "
          f"{r['trainable'] or '-'} |" for label, r in results.items()),
    ]  # fmt: skip
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(results) - 2 :]))
    return [md, write_grid(samples, per_class, grid), write_error_plot(results, plot)]


def efficientdm_main(args: Any, command: str) -> None:
    """`--task digits-efficientdm`: the evaluation, its table and pictures under `args.out_dir`."""
    from mmpeft.lab import records

    out = Path(args.out_dir)
    paths = [out / f"digits-efficientdm{suffix}" for suffix in (".md", ".png", "-error.png")]
    try:
        records.refuse_overwrite(paths, args.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}") from None
    trajectories = args.epochs or 32
    results, samples = efficientdm_eval(trajectories, seed=(args.seeds or [0])[0])
    written = write_report(results, samples, out, command, trajectories, 20)
    print(f"wrote {', '.join(map(str, written))}")
