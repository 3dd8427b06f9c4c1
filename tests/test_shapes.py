"""The procedural shapes of the point-cloud quickstart (its transfer is checked in test_quickstart.py)."""

from __future__ import annotations

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
