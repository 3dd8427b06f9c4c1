"""Datamodules: the embedded digits transfer task and the generic image-list format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.data import DigitsDataModule, ImageListDataModule
from mmpeft.data.digits import digits_arrays


def test_upstream_and_downstream_pools_are_disjoint_and_rotated():
    up, up_labels = digits_arrays("upstream")
    down, down_labels = digits_arrays("downstream")
    assert len(up) + len(down) == 1797 and len(up) == round(0.7 * 1797)
    assert set(up_labels) == set(down_labels) == set(range(10))
    flat_up = {im.tobytes() for im in up}
    from sklearn.datasets import load_digits

    raw = (load_digits().images.astype(np.float32) / 16.0 - 0.5) / 0.5
    # every downstream image is a 90-degree rotation of an original image that is not upstream
    originals = {im.tobytes(): i for i, im in enumerate(raw)}
    for im in down[:50, 0]:
        unrotated = np.rot90(im, k=-1).copy()
        assert unrotated.tobytes() in originals
    assert not any(np.rot90(im, k=-1).copy().tobytes() in flat_up for im in down[:50, 0] if not np.allclose(im, im.T))


def test_downstream_splits_are_seeded_stratified_and_disjoint():
    a, b, c = (DigitsDataModule(seed=s) for s in (0, 0, 1))
    for d in (a, b, c):
        d.setup()
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"train": 270, "val": 108, "test": 161}
    assert torch.equal(a.splits["train"].images, b.splits["train"].images)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)
    keys = {k: {im.numpy().tobytes() for im in v.images} for k, v in a.splits.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    counts = torch.bincount(a.splits["train"].labels, minlength=10)
    pool = np.bincount(digits_arrays("downstream")[1], minlength=10)
    assert counts.tolist() == [round(0.5 * n) for n in pool], "stratified: half of every class trains"


def test_k_shot_subsets():
    d = DigitsDataModule(shots=4, seed=3)
    d.setup()
    assert torch.equal(torch.bincount(d.splits["train"].labels), torch.full((10,), 4))
    with pytest.raises(ValueError, match="fewer than shots=100"):
        DigitsDataModule(shots=100).setup()


def test_upstream_shift_augmentation_moves_pixels_by_one():
    d = DigitsDataModule("upstream")
    d.setup()
    ds = d.splits["train"]
    assert ds.shift == 1
    torch.manual_seed(0)
    shifted = {tuple(ds[0][0].flatten().tolist()) for _ in range(30)}
    assert len(shifted) > 1
    for _ in range(5):
        image = ds[0][0]
        assert image.shape == (1, 8, 8) and image.min() >= -1 and image.max() <= 1


def _write_image_list(root, n=6, classes=3):
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"images/img {i}.png"  # a space in the path
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(root / name)
        lines.append(f"{name} {i % classes}")
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_image_list_datamodule_reads_the_list_format(tmp_path):
    _write_image_list(tmp_path)
    dm = ImageListDataModule(str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    assert dm.num_classes == 3
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}
    image, _ = dm.dataset("test")[0]
    assert torch.allclose(image, torch.full_like(image, -1.0)), "a black image normalises to -1 with mean=std=0.5"


def test_image_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Expected layout"):
        ImageListDataModule(str(tmp_path / "missing"))
    _write_image_list(tmp_path)
    (tmp_path / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['val.txt'\]"):
        ImageListDataModule(str(tmp_path))
    (tmp_path / "val.txt").write_text("images/img 0.png zero\n")
    with pytest.raises(ValueError, match="expected '<relative/path> <integer label>'"):
        ImageListDataModule(str(tmp_path))
    (tmp_path / "val.txt").write_text("images/img 0.png 7\n")
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        ImageListDataModule(str(tmp_path))


def test_a_few_shot_image_loader_keeps_every_sample_and_never_trains_on_one():
    """5-shot digits at batch 7: 50 images leave one over, which joins the last batch (nothing is dropped); the
    batches stay a function of (seed, epoch), so a fresh loader set to an epoch repeats that epoch."""

    def epochs(loader, count):
        return [[(images, labels) for images, labels in loader] for _ in range(count)]

    data = DigitsDataModule("downstream", batch_size=7, shots=5)
    data.setup()
    train = data.splits["train"]
    assert len(train) == 50 and 50 % 7 == 1
    everything = sorted(image.numpy().tobytes() for image, _ in train)
    first = epochs(data.train_dataloader(), 2)
    for batches in first:
        assert [len(labels) for _, labels in batches] == [7] * 6 + [8]
        assert sorted(image.numpy().tobytes() for images, _ in batches for image in images) == everything
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(*first)), "each epoch has its own order"
    again = data.train_dataloader()
    again.batch_sampler.sampler.set_epoch(1)  # what Lightning does at the start of epoch 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[1], epochs(again, 1)[0]))
