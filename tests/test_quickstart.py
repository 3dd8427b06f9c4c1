"""Each quickstart (digits; point-cloud shapes) is a real transfer: checked on a reduced budget, with the
upstream cache reused, by margins above seed noise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mmpeft.backbones import digits, shapes
from mmpeft.pretrain import digits as pretrain_digits
from mmpeft.pretrain import shapes as pretrain_shapes


@dataclass(frozen=True)
class Budget:
    """A quickstart's reduced budget and its margins."""

    backbone: type
    pretraining: object  # the module whose builder must not run again once cached
    builder: str
    pretrain_epochs: int
    downstream_epochs: int
    probe_margin: float  # pretrained probe over the random-weights probe
    size_ratio: int  # the PEFT method trains fewer than full / size_ratio
    seeds: tuple[int, ...]  # the run seeds of every row but the random-weights probe


BUDGETS = {
    # digits: the shipped recipe pretrains 40 epochs; 25 keeps the suite fast and still transfers. One seed: its
    # margins are 9 points (LoRA over the probe) and 22 (full over scratch) in the README's table
    "digits": Budget(digits.DigitsViT, pretrain_digits, "pretrain_digits_vit", 25, 15, 0.1, 10, (0,)),
    # shapes: the shipped recipe pretrains 20 epochs. Single runs on 450 test clouds move by 1-3 points with the
    # seed (at 25 downstream epochs full fine-tuning lost to scratch at seed 0, 0.884 vs 0.887, and won by 3
    # points on the mean of three seeds), so every row is a mean over three seeds; at 15 downstream epochs the
    # margins were 3.9 points (LoRA over the probe) and 5.6 (full over scratch), 5 and 11 standard errors
    "shapes": Budget(
        shapes.ShapesPointTransformer, pretrain_shapes, "pretrain_shapes_point", 8, 15, 0.05, 5, (0, 1, 2)
    ),
}
LABELS = ["linear probe, random weights", "linear probe", "lora (quickstart)", "full fine-tuning", "from scratch"]
NOISE_MULTIPLE = 2.0  # a multi-seed margin must exceed this many standard errors of the difference of the means


@pytest.fixture(scope="module", params=sorted(BUDGETS))
def transfer(request, tmp_path_factory):
    from mmpeft.quickstart import transfer_table

    task, budget = request.param, BUDGETS[request.param]
    cache = tmp_path_factory.mktemp(f"cache_{task}")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMPEFT_CACHE", str(cache))
    runs = str(tmp_path_factory.mktemp(f"runs_{task}"))
    # validation only after the last epoch: the runs report the final model, so nothing else changes
    once = [f"--trainer.check_val_every_n_epoch={budget.downstream_epochs}"]
    epochs, pre = budget.downstream_epochs, budget.pretrain_epochs
    results = transfer_table(epochs, runs, LABELS[:1], pre, task=task, extra=once)  # far below the rest: one seed
    results |= transfer_table(epochs, runs, LABELS[1:], pre, task=task, seeds=budget.seeds, extra=once)
    yield results, cache, budget
    mp.undo()


def beats(better: dict[str, Any], worse: dict[str, Any], margin: float = 0.0) -> None:
    """`better`'s mean test accuracy exceeds `worse`'s by `margin` and, when seeds were repeated, by
    NOISE_MULTIPLE standard errors of the difference of the means (seed noise)."""
    gap = better["test_acc"] - worse["test_acc"]
    noise = math.sqrt(sum(r["test_acc_std"] ** 2 / len(r["test_accs"]) for r in (better, worse)))
    assert gap > margin + NOISE_MULTIPLE * noise, (
        f"test acc {better['test_accs']} vs {worse['test_accs']}: gap {gap:.4f}, needed {margin} + "
        f"{NOISE_MULTIPLE} x {noise:.4f} (seed noise)"
    )


def test_pretrained_probe_beats_random_weights(transfer):
    r, _, budget = transfer
    beats(r["linear probe"], r["linear probe, random weights"], budget.probe_margin)


def test_quickstart_method_beats_the_linear_probe(transfer):
    r, _, budget = transfer
    beats(r["lora (quickstart)"], r["linear probe"])
    assert r["lora (quickstart)"]["trainable"] < r["full fine-tuning"]["trainable"] / budget.size_ratio


def test_full_finetuning_from_pretrained_beats_training_from_scratch(transfer):
    r, _, _ = transfer
    beats(r["full fine-tuning"], r["from scratch"])


def test_the_cached_upstream_backbone_is_reused(transfer, monkeypatch):
    _, cache, budget = transfer
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1, "pretrained once for all the pretrained runs"
    monkeypatch.setenv("MMPEFT_CACHE", str(cache))

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached backbone should have been loaded")

    monkeypatch.setattr(budget.pretraining, budget.builder, no_retraining)
    first = budget.backbone(pretrained=True, epochs=budget.pretrain_epochs)
    assert files[0].name.startswith(f"{first.name}-"), "the cache file is named after the backbone"
    second = budget.backbone(weights=str(files[0]))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    random = budget.backbone(pretrained=False)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, first.blocks[0].attn.qkv.weight)
