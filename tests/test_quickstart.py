"""The quickstart is a real transfer: checked on a reduced budget, with the upstream cache reused."""

from __future__ import annotations

import pytest
import torch

from mmpeft.backbones import digits
from mmpeft.pretrain import digits as pretrain_digits

PRETRAIN_EPOCHS = 25  # the shipped recipe uses 40; 25 keeps the suite fast and still transfers
DOWNSTREAM_EPOCHS = 15


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    from mmpeft.quickstart import transfer_table

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMPEFT_CACHE", str(cache))
    labels = ["linear probe, random weights", "linear probe", "lora (quickstart)", "full fine-tuning", "from scratch"]
    runs = tmp_path_factory.mktemp("runs")
    results = transfer_table(DOWNSTREAM_EPOCHS, str(runs), labels, pretrain_epochs=PRETRAIN_EPOCHS)
    yield results, cache
    mp.undo()


def test_pretrained_probe_beats_random_weights(transfer):
    r, _ = transfer
    assert r["linear probe"]["test_acc"] > r["linear probe, random weights"]["test_acc"] + 0.1


def test_quickstart_method_beats_the_linear_probe(transfer):
    r, _ = transfer
    assert r["lora (quickstart)"]["test_acc"] > r["linear probe"]["test_acc"]
    assert r["lora (quickstart)"]["trainable"] < r["full fine-tuning"]["trainable"] / 10


def test_full_finetuning_from_pretrained_beats_training_from_scratch(transfer):
    r, _ = transfer
    assert r["full fine-tuning"]["test_acc"] > r["from scratch"]["test_acc"]


def test_the_cached_upstream_backbone_is_reused(transfer, monkeypatch):
    _, cache = transfer
    files = list(cache.glob("digits_vit-*.safetensors"))
    assert len(files) == 1, "pretrained once for all the pretrained runs"
    monkeypatch.setenv("MMPEFT_CACHE", str(cache))

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached backbone should have been loaded")

    monkeypatch.setattr(pretrain_digits, "pretrain_digits_vit", no_retraining)
    first = digits.DigitsViT(pretrained=True, epochs=PRETRAIN_EPOCHS)
    second = digits.DigitsViT(weights=str(files[0]))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    random = digits.DigitsViT(pretrained=False)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, first.blocks[0].attn.qkv.weight)
