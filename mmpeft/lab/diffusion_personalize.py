"""The digits personalization quickstart: DreamBooth on a class-conditional DiT, offline on a CPU.

The digits-diffusion quickstart's pixel DiT (pretrained by mmpeft on upright digits) learns a style it never saw,
five 90-degree-rotated sevens, as a new class 10 (`configs/diffusion/digits_personalize.yaml`: LoRA, the class
table grown by one row), with and without prior preservation on the ten digits. Two small CNNs score the samples:
one trained on real rotated digits says whether class 10 draws the new style (the share of its samples it calls a
seven: subject fidelity), one trained on real upright digits says whether the digits 0-9 are still drawn as
themselves (their conditional accuracy: what prior preservation is for).

    python -m mmpeft.quickstart --task digits-personalize   # table + experiments/transfer/digits-personalize.png
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["CONFIG", "NEW_CLASS", "STYLE_DIGIT", "PERSONALIZE_RUNS", "diffusion_personalize", "write_instances"]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "diffusion" / "digits_personalize.yaml"
NEW_CLASS = 10  # the label the new style gets (the ten digits keep 0-9)
STYLE_DIGIT = 7  # the five instance images are rotated sevens
INSTANCES = 5
# label -> command-line options on top of the config; None: the frozen pretrained model with the grown table
PERSONALIZE_RUNS: dict[str, list[str] | None] = {
    "frozen": None,
    "lora, prior preservation": [],
    # the same number of steps without the class half: the five images repeated 20 times an epoch
    "lora, no prior": [
        "--data.init_args.class_dir=null",
        "--data.init_args.prior_classes=null",
        "--data.init_args.repeats=20",
    ],  # fmt: skip
}


def write_instances(folder: Path, digit: int = STYLE_DIGIT, count: int = INSTANCES) -> list[Path]:
    """The subject's photos: the first `count` rotated `digit`s of the rotated digits' training split, as the
    8x8 grayscale PNGs a user would put in a folder."""
    from PIL import Image

    from mmpeft.data.digits import DigitsDataModule

    data = DigitsDataModule("downstream", seed=0, train_fraction=0.7, val_fraction=0.0, shift=0)
    data.setup("fit")
    train = data.splits["train"]
    picked = train.images[train.labels == digit][:count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(picked):
        pixels = ((image[0] + 1) / 2 * 255).round().clamp(0, 255).byte().numpy()
        paths.append(folder / f"{digit}-rotated-{i}.png")
        Image.fromarray(pixels, mode="L").save(paths[-1])
    return paths


def personalize(workdir: Path, label: str, options: list[str], epochs: int | None = None, seed: int = 0,
                pretrain_epochs: int | None = None) -> nn.Module:  # fmt: skip
    """`configs/diffusion/digits_personalize.yaml` run on `workdir`'s instance folder (class images in
    `workdir/class_images`, made once; `epochs`: the config's 90 unless given); returns the trained PeftModel."""
    from mmpeft.lab.lightning_cli import run_cli

    args = [
        f"--config={CONFIG}", f"--seed_everything={seed}",
        f"--data.init_args.instance_dir={workdir / 'instance'}",
        f"--data.init_args.class_dir={workdir / 'class_images'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--run.wandb=disabled",
        f"--run.dir={workdir / 'runs'}", f"--run.name={label.replace(', ', '-').replace(' ', '-')}",
        "--run.test_after_fit=false",
    ]  # fmt: skip
    if epochs:
        args.append(f"--trainer.max_epochs={epochs}")
    if pretrain_epochs:
        args.append(f"--model.init_args.backbone.init_args.epochs={pretrain_epochs}")
    cli = run_cli([*args, *options], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.model.eval()


def frozen_model(pretrain_epochs: int | None = None) -> nn.Module:
    """The pretrained DiT with the grown class table and nothing trained: the baseline."""
    from mmpeft.backbones.digits_dit import DigitsDiT
    from mmpeft.core.model import PeftModel

    backbone = DigitsDiT(pretrained=True, epochs=pretrain_epochs, add_classes=1, new_class_init=[STYLE_DIGIT])
    return PeftModel(backbone, "lora").eval()


def score_personalization(images: torch.Tensor, labels: torch.Tensor, rotated: nn.Module,
                          upright: nn.Module) -> dict[str, float]:  # fmt: skip
    """style: the share of the new class's samples the rotated-digit CNN calls a seven; kept: the upright CNN's
    conditional accuracy on the samples of digits 0-9."""
    new = labels == NEW_CLASS
    with torch.no_grad():
        style = float((rotated(images[new]).argmax(-1) == STYLE_DIGIT).float().mean())
        kept = float((upright(images[~new]).argmax(-1) == labels[~new]).float().mean())
    return {"style": style, "kept": kept}


def diffusion_personalize(workdir: str | Path, epochs: int | None = None, per_class: int = 20, steps: int = 25,
                          seed: int = 0, labels: Sequence[str] | None = None, pretrain_epochs: int | None = None,
                          log: Callable[[str], None] = print) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """label -> {style, kept, trainable, seconds} for every run of `PERSONALIZE_RUNS`, and each run's samples
    (`per_class` of each label 0-10)."""
    from mmpeft.core.report import parameter_report
    from mmpeft.lab.diffusion_transfer import digits_classifier, sample_digits

    workdir = Path(workdir)
    write_instances(workdir / "instance")
    rotated, rotated_acc = digits_classifier(seed=seed)
    upright, upright_acc = digits_classifier(seed=seed, task="upstream")
    log(f"scorers: CNNs on real rotated / upright digits, test accuracy {rotated_acc:.3f} / {upright_acc:.3f}")
    results, samples = {}, {}
    for label in labels or list(PERSONALIZE_RUNS):
        options = PERSONALIZE_RUNS[label]
        start = time.perf_counter()
        if options is None:
            model, trainable = frozen_model(pretrain_epochs), 0
        else:
            model = personalize(workdir, label, options, epochs, seed, pretrain_epochs)
            trainable = parameter_report(model).trainable
        images, classes = sample_digits(model, per_class, steps, seed=seed, classes=range(NEW_CLASS + 1))
        results[label] = {**score_personalization(images, classes, rotated, upright), "trainable": trainable,
                          "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        samples[label] = images
        r = results[label]
        log(f"{label}: class {NEW_CLASS} drawn as a rotated {STYLE_DIGIT} {r['style']:.3f}, digits 0-9 kept "
            f"{r['kept']:.3f}, {trainable:,} trainable, {r['seconds']} s")  # fmt: skip
    return results, samples
