"""The procedural shapes of the point-cloud quickstart (its transfer is checked in test_quickstart.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpeft.data.shapes import DOWNSTREAM, UPSTREAM, ShapesDataModule, shapes_arrays


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
    train, val = data.datasets["train"].points, data.datasets["val"].points
    assert not any(torch.equal(a, b) for a in train for b in val)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (20, 64, 3) and data.num_classes == 10 and y.dtype == torch.int64
    first = data.datasets["train"][0][0]
    assert not torch.equal(first, data.datasets["train"][0][0]) and torch.allclose(
        first.sort(0).values, train[0].sort(0).values
    ), "the same points in another order"
    with pytest.raises(ValueError, match="unknown shapes task"):
        ShapesDataModule("sideways")


PRETRAIN = """
import hashlib, json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from mmpeft.backbones.shapes import ARCH, RECIPE
from mmpeft.backbones.weights import pretrained_weights, read_state_dict
path = pretrained_weights("shapes_point", ARCH, {**RECIPE, "epochs": 1, "per_class": 8, "warmup_epochs": 0})
digest = hashlib.sha1()
for name, tensor in sorted(read_state_dict(path).items()):
    digest.update(name.encode() + tensor.numpy().tobytes())
print(json.dumps({"sha1": digest.hexdigest(), "threads_after": torch.get_num_threads()}))
"""


def test_the_cached_pretraining_gives_the_same_weights_at_any_thread_count(tmp_path):
    """The quickstart backbone pretrained by a 1-thread and a 2-thread process (fresh caches): the same tensors,
    and each process keeps its own thread count afterwards."""
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for threads in (1, 2):
        env = {**os.environ, "MMPEFT_CACHE": str(tmp_path / f"cache{threads}"), "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", PRETRAIN, str(threads)], env=env, cwd=root, capture_output=True,
                             text=True, timeout=600, check=True).stdout  # fmt: skip
        runs[threads] = json.loads(out.strip().splitlines()[-1])
    assert runs[1]["sha1"] == runs[2]["sha1"]
    assert [runs[t]["threads_after"] for t in (1, 2)] == [1, 2]
