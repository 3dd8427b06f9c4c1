"""Each quickstart (digits; point-cloud shapes) is a real transfer: checked on a reduced budget, with the
upstream cache reused."""

from __future__ import annotations

from dataclasses import dataclass

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


BUDGETS = {
    # digits: the shipped recipe pretrains 40 epochs; 25 keeps the suite fast and still transfers
    "digits": Budget(digits.DigitsViT, pretrain_digits, "pretrain_digits_vit", 25, 15, 0.1, 10),
    # shapes: the shipped recipe pretrains 20 epochs
    "shapes": Budget(shapes.ShapesPointTransformer, pretrain_shapes, "pretrain_shapes_point", 8, 25, 0.05, 5),
}
LABELS = ["linear probe, random weights", "linear probe", "lora (quickstart)", "full fine-tuning", "from scratch"]


@pytest.fixture(scope="module", params=sorted(BUDGETS))
def transfer(request, tmp_path_factory):
    from mmpeft.quickstart import transfer_table

    task, budget = request.param, BUDGETS[request.param]
    cache = tmp_path_factory.mktemp(f"cache_{task}")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMPEFT_CACHE", str(cache))
    runs = tmp_path_factory.mktemp(f"runs_{task}")
    results = transfer_table(budget.downstream_epochs, str(runs), LABELS, budget.pretrain_epochs, task=task)
    yield results, cache, budget
    mp.undo()


def test_pretrained_probe_beats_random_weights(transfer):
    r, _, budget = transfer
    assert r["linear probe"]["test_acc"] > r["linear probe, random weights"]["test_acc"] + budget.probe_margin


def test_quickstart_method_beats_the_linear_probe(transfer):
    r, _, budget = transfer
    assert r["lora (quickstart)"]["test_acc"] > r["linear probe"]["test_acc"]
    assert r["lora (quickstart)"]["trainable"] < r["full fine-tuning"]["trainable"] / budget.size_ratio


def test_full_finetuning_from_pretrained_beats_training_from_scratch(transfer):
    r, _, _ = transfer
    assert r["full fine-tuning"]["test_acc"] > r["from scratch"]["test_acc"]


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
