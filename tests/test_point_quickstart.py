"""The point-cloud quickstart is a real transfer: checked on a reduced budget, with the upstream cache reused;
and the procedural shapes it runs on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft.backbones import shapes
from mmpeft.data.shapes import DOWNSTREAM, UPSTREAM, ShapesDataModule, shapes_arrays
from mmpeft.pretrain import shapes as pretrain_shapes

PRETRAIN_EPOCHS = 8  # the shipped recipe uses 20
DOWNSTREAM_EPOCHS = 25


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    from mmpeft.quickstart import transfer_table

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMPEFT_CACHE", str(cache))
    labels = ["linear probe, random weights", "linear probe", "lora (quickstart)", "full fine-tuning", "from scratch"]
    runs = tmp_path_factory.mktemp("runs")
    results = transfer_table(DOWNSTREAM_EPOCHS, str(runs), labels, pretrain_epochs=PRETRAIN_EPOCHS, task="shapes")
    yield results, cache
    mp.undo()


def test_pretrained_probe_beats_random_weights(transfer):
    r, _ = transfer
    assert r["linear probe"]["test_acc"] > r["linear probe, random weights"]["test_acc"] + 0.05


def test_quickstart_method_beats_the_linear_probe(transfer):
    r, _ = transfer
    assert r["lora (quickstart)"]["test_acc"] > r["linear probe"]["test_acc"]
    assert r["lora (quickstart)"]["trainable"] < r["full fine-tuning"]["trainable"] / 5


def test_full_finetuning_from_pretrained_beats_training_from_scratch(transfer):
    r, _ = transfer
    assert r["full fine-tuning"]["test_acc"] > r["from scratch"]["test_acc"]


def test_the_cached_upstream_backbone_is_reused(transfer, monkeypatch):
    _, cache = transfer
    files = list(cache.glob("shapes_point-*.safetensors"))
    assert len(files) == 1, "pretrained once for all the pretrained runs"
    monkeypatch.setenv("MMPEFT_CACHE", str(cache))

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached backbone should have been loaded")

    monkeypatch.setattr(pretrain_shapes, "pretrain_shapes_point", no_retraining)
    first = shapes.ShapesPointTransformer(pretrained=True, epochs=PRETRAIN_EPOCHS)
    second = shapes.ShapesPointTransformer(weights=str(files[0]))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(shapes.ShapesPointTransformer(pretrained=False).blocks[0].attn.qkv.weight,
                           first.blocks[0].attn.qkv.weight)  # fmt: skip


def test_shapes_are_seeded_normalised_and_split_by_class_set():
    clouds, labels = shapes_arrays("downstream", 3, 128, seed=5)
    again, _ = shapes_arrays("downstream", 3, 128, seed=5)
    other, _ = shapes_arrays("downstream", 3, 128, seed=6)
    assert clouds.shape == (3 * len(DOWNSTREAM), 128, 3) and np.array_equal(clouds, again)
    assert not np.array_equal(clouds, other)
    assert np.abs(clouds.mean(1)).max() < 1e-5 and np.isclose(np.linalg.norm(clouds, axis=-1).max(1), 1).all()
    assert np.bincount(labels).tolist() == [3] * len(DOWNSTREAM)
    assert not set(UPSTREAM) & set(DOWNSTREAM), "downstream classes are never seen upstream"


def test_shapes_datamodule_splits_are_disjoint_and_training_shuffles_points():
    data = ShapesDataModule("upstream", train_per_class=2, val_per_class=2, test_per_class=2, num_points=64)
    data.setup()
    train, val = data.datasets["train"].clouds, data.datasets["val"].clouds
    assert not any(torch.equal(a, b) for a in train for b in val)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (20, 64, 3) and data.num_classes == 10 and y.dtype == torch.int64
    first = data.datasets["train"][0][0]
    assert not torch.equal(first, data.datasets["train"][0][0]) and torch.allclose(
        first.sort(0).values, train[0].sort(0).values
    ), "the same points in another order"
    with pytest.raises(ValueError, match="unknown shapes task"):
        ShapesDataModule("sideways")
