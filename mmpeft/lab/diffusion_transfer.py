"""The digits-diffusion quickstart: a real transfer for diffusion PEFT, offline on a CPU.

mmpeft pretrains a tiny pixel-space class-conditional DiT on the upright digits (`digits_dit`, cached), then
fine-tunes it to the rotated digits (the classification quickstart's downstream pool) with each method. A small
classifier trained on real rotated digits scores the samples: FID in its penultimate features (torchmetrics' FID,
against the real rotated test digits) and the share of samples it classifies as their conditioning class. The
frozen pretrained model draws upright digits, so both scores say how far each method moved it.

    python -m mmpeft.quickstart --task digits-diffusion      # table + experiments/transfer/digits-diffusion.png
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DIFFUSION_RUNS", "digits_classifier", "diffusion_transfer", "sample_digits", "score_digits"]

# label -> (method spec, learning rate); "frozen" is the pretrained model as it is
DIFFUSION_RUNS: dict[str, tuple[Any, float]] = {
    "frozen": (None, 0.0),
    "difffit": ({"name": "difffit", "preset": "paper"}, 3e-2),  # 15x the pretraining lr (the paper: 10x)
    "lora": ({"name": "lora", "r": 8}, 1e-2),
    "full": ("full", 1e-3),
}


class DigitsClassifier(nn.Module):
    """A small CNN on 8x8 digits in [-1, 1]; `features` is its penultimate layer (FID's feature space)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.Linear(width * 16, 64), nn.GELU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def digits_classifier(epochs: int = 30, seed: int = 0, task: str = "downstream") -> tuple[DigitsClassifier, float]:
    """The scorer: trained on the real rotated digits' training split (`task="upstream"`: the upright ones);
    returns it and its test accuracy."""
    from mmpeft.data.digits import DigitsDataModule

    torch.manual_seed(seed)
    data = DigitsDataModule(task, batch_size=64, seed=seed, train_fraction=0.7, val_fraction=0.0, shift=1)
    data.setup("fit")
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for images, labels in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    test = data.splits["test"]
    with torch.no_grad():
        acc = float((model(test.images).argmax(-1) == test.labels).float().mean())
    return model.requires_grad_(False), acc


@torch.no_grad()
def sample_digits(model: nn.Module, per_class: int, steps: int = 50, guidance_scale: float = 2.0,
                  seed: int = 0, classes: Sequence[int] = range(10)) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`per_class` samples of every class (the ten digits by default) through diffusers' DDIM loop
    (`ClassConditionalPipeline`, pixel space): (images [N, 1, 8, 8] in [-1, 1], labels [N])."""
    from diffusers import DDIMScheduler

    from mmpeft.backbones.digits_dit import DIGITS_SCHEDULE
    from mmpeft.interop.class_pipeline import ClassConditionalPipeline
    from mmpeft.interop.sampling import PipelineDenoiser

    scheduler = DDIMScheduler(**DIGITS_SCHEDULE, clip_sample=True, set_alpha_to_one=True)
    pipe = ClassConditionalPipeline(PipelineDenoiser(model.eval(), scheduler), scheduler, vae=None)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.as_tensor(list(classes)).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(labels.tolist(), steps, guidance_scale, generator, output_type="np").images
    images = torch.from_numpy(out).permute(0, 3, 1, 2)[:, :1] * 2 - 1
    return images, labels


def score_digits(images: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier,
                 real: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """FID in the classifier's features against `real` rotated digits, and the conditional accuracy."""
    from mmpeft.interop.image_metrics import fid_score

    class Features(nn.Module):  # FID's [N, 3, H, W] in [0, 1] -> the classifier's features
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return classifier.features(x[:, :1] * 2 - 1)

    rgb = lambda x: ((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        acc = float((classifier(images).argmax(-1) == labels).float().mean())
    return {"fid": fid_score(rgb(images), rgb(real), features=Features()), "cond_acc": acc}


def fine_tune(method: Any, lr: float, epochs: int, seed: int = 0, pretrain_epochs: int | None = None) -> nn.Module:
    """The pretrained digits DiT fine-tuned on the rotated digits' training split with `method` (plain loop, the
    shared training step; AdamW, warmup then cosine)."""
    from diffusers import DDPMScheduler

    from mmpeft.backbones.digits_dit import DIGITS_SCHEDULE, DigitsDiT
    from mmpeft.core.model import PeftModel
    from mmpeft.data.digits import DigitsDataModule
    from mmpeft.pretrain.common import train_from_scratch
    from mmpeft.pretrain.digits_dit import noised

    torch.manual_seed(seed)
    model = PeftModel(DigitsDiT(pretrained=True, epochs=pretrain_epochs), method or "full")
    if method is None:
        return model.eval()
    data = DigitsDataModule("downstream", batch_size=64, seed=seed, train_fraction=0.7, val_fraction=0.0, shift=0)
    data.setup("fit")
    scheduler = DDPMScheduler(**DIGITS_SCHEDULE)
    recipe = {"epochs": epochs, "lr": lr, "weight_decay": 0.0, "warmup_epochs": 1}
    label = method if isinstance(method, str) else method["name"]
    train_from_scratch(model, data.train_dataloader(), F.mse_loss, recipe, f"fine-tuning with {label}",
                       progress=False, batches=lambda loader: noised(loader, scheduler))  # fmt: skip
    return model.eval()


def diffusion_transfer(epochs: int = 120, per_class: int = 20, steps: int = 50, seed: int = 0,
                       labels: Sequence[str] | None = None, pretrain_epochs: int | None = None,
                       log: Callable[[str], None] = print) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """label -> {fid, cond_acc, trainable, seconds} for every run of `DIFFUSION_RUNS`, and each run's samples."""
    from mmpeft.core.report import parameter_report
    from mmpeft.data.digits import DigitsDataModule

    classifier, acc = digits_classifier(seed=seed)
    log(f"scorer: a CNN trained on the real rotated digits, test accuracy {acc:.3f}")
    data = DigitsDataModule("downstream", seed=seed, train_fraction=0.7, val_fraction=0.0, shift=0)
    data.setup("fit")
    real = data.splits["test"].images
    results, samples = {}, {}
    for label in labels or list(DIFFUSION_RUNS):
        method, lr = DIFFUSION_RUNS[label]
        start = time.perf_counter()
        model = fine_tune(method, lr, epochs, seed, pretrain_epochs)
        images, classes = sample_digits(model, per_class, steps, seed=seed)
        scores = score_digits(images, classes, classifier, real)
        trainable = 0 if method is None else parameter_report(model).trainable
        results[label] = {**scores, "trainable": trainable, "seconds": round(time.perf_counter() - start, 1)}
        samples[label] = images
        log(f"{label}: FID {scores['fid']:.2f}, conditional accuracy {scores['cond_acc']:.3f}, "
            f"{trainable:,} trainable, {results[label]['seconds']} s")  # fmt: skip
    return results, samples


def write_grid(samples: dict[str, torch.Tensor], per_class: int, path: str | Path, classes: int = 10) -> Path:
    """One row per run (frozen first), the first sample of each class (digits 0-9) across, 4x upscaled: a PNG."""
    from PIL import Image

    rows = []
    for images in samples.values():
        first = images[::per_class][:classes]  # class k's first sample
        rows.append(torch.cat(list(first[:, 0]), dim=1))
    grid = ((torch.cat(rows, dim=0) + 1) / 2).clamp(0, 1)
    picture = Image.fromarray((grid * 255).byte().numpy()).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
