"""Point-cloud data: ScanObjectNN h5 and ModelNet40 pickle / txt fixtures, protocols, the restricted unpickler,
augmentations and test-time voting."""

from __future__ import annotations

import builtins
import math
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from mmpeft.core.errors import ConfigMismatch
from mmpeft.data import ModelNet40DataModule, ScanObjectNNDataModule
from mmpeft.data.checks import DataError
from mmpeft.data.modelnet40 import MODELNET40_CLASSES, load_modelnet_pickle
from mmpeft.data.point_clouds import MissingPointData, stratified_split
from mmpeft.data.point_fixtures import write_modelnet40_fixture, write_scanobjectnn_fixture
from mmpeft.data.point_transforms import (
    RandomSubset,
    RotateUp,
    ScaleAndTranslate,
    build_augment,
    farthest_point_order,
    normalize_unit_sphere,
)
from mmpeft.data.scanobjectnn import SCANOBJECTNN_CLASSES, SCANOBJECTNN_FILES
from mmpeft.tasks.point import vote_logits


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    for variant in SCANOBJECTNN_FILES:
        write_scanobjectnn_fixture(root, variant, n_train=60, n_test=30, points=64)
    return root


@pytest.fixture(scope="module")
def mn_pickle(tmp_path_factory):
    return write_modelnet40_fixture(tmp_path_factory.mktemp("mn_pickle"), "pickle", n_train=120, n_test=40)


@pytest.fixture(scope="module")
def mn_txt(tmp_path_factory):
    return write_modelnet40_fixture(tmp_path_factory.mktemp("mn_txt"), "txt", n_train=60, n_test=20)


def first_batch(dm, split: str):
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return next(iter(loader))


# -- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(SCANOBJECTNN_FILES))
@pytest.mark.parametrize("num_points", [64, 32])
def test_scanobjectnn_loads_every_variant(scan_root, variant, num_points):
    dm = ScanObjectNNDataModule(str(scan_root), variant, num_points=num_points, batch_size=8)
    assert dm.num_classes == 15 and dm.class_names == SCANOBJECTNN_CLASSES and dm.class_names[-1] == "toilet"
    dm.setup()
    sizes = {split: len(dm.dataset(split)) for split in ("train", "val", "test")}
    assert sizes["train"] + sizes["val"] == 60 and sizes["test"] == 30
    for split in ("train", "val", "test"):
        points, labels = first_batch(dm, split)
        assert points.shape == (8, num_points, 3) and points.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 15
    assert sorted(dm.data["test"][1].tolist()) == sorted((i * 7 + 3) % 15 for i in range(30))


def test_scanobjectnn_keeps_h5_points_and_normalizes_on_request(scan_root):
    import h5py

    with h5py.File(scan_root / SCANOBJECTNN_FILES["OBJ_BG"][1], "r") as file:
        raw = torch.from_numpy(file["data"][()])
    plain = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64)
    points, _ = plain.dataset("test")[0]
    assert torch.equal(points, raw[0])  # as the official repos: the h5 clouds unchanged, all 64 points
    unit = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, normalize="unit_sphere")
    points, _ = unit.dataset("test")[0]
    assert points.mean(0).abs().max() < 1e-5 and math.isclose(points.norm(dim=1).max().item(), 1.0, abs_tol=1e-5)


def test_fps_subset_for_fewer_points(scan_root):
    """num_points < the cloud's size: evaluation takes the FPS to N, training N of the FPS to ceil(1.2 N)."""
    import h5py

    with pytest.warns(UserWarning, match="TEST SPLIT"):
        dm = ScanObjectNNDataModule(str(scan_root), "OBJ_ONLY", num_points=20, protocol="paper")
    dm.setup()
    with h5py.File(scan_root / SCANOBJECTNN_FILES["OBJ_ONLY"][1], "r") as file:
        raw = torch.from_numpy(file["data"][()])
    order = farthest_point_order(raw[:1], 20)[0]
    points, _ = dm.dataset("test")[0]
    assert torch.equal(points, raw[0, order])
    assert dm.pool == 24 and dm.data["train"][0].shape[1] == 24
    drawn, _ = dm.dataset("train")[0]
    assert drawn.shape == (20, 3)


def test_farthest_point_order_prefix_is_fps():
    xyz = torch.randn(3, 50, 3, generator=torch.Generator().manual_seed(0))
    long, short = farthest_point_order(xyz, 30), farthest_point_order(xyz, 10)
    assert torch.equal(long[:, :10], short) and (long[:, 0] == 0).all()
    assert all(len(set(row.tolist())) == 30 for row in long)
    # the next FPS point is the one farthest from those chosen so far
    chosen = xyz[0, long[0, :5]]
    distance = torch.cdist(xyz[0], chosen).min(dim=1).values
    assert distance.argmax() == long[0, 5]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_modelnet_pickle_loads(tmp_path, protocol):
    root = write_modelnet40_fixture(tmp_path, "pickle", n_train=40, n_test=20, points=48, protocol=protocol)
    dm = ModelNet40DataModule(str(root), num_points=32, batch_size=4)
    assert dm.resolved_layout == "pickle" and dm.class_names == MODELNET40_CLASSES
    points, labels = first_batch(dm, "test")
    assert points.shape == (4, 32, 3) and labels.tolist() == [(i * 7 + 3) % 40 for i in range(4)]
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 40 and len(dm.dataset("test")) == 20


def test_modelnet_pickle_sample_is_normalised(mn_pickle):
    dm = ModelNet40DataModule(str(mn_pickle), num_points=64)
    clouds, labels = load_modelnet_pickle(mn_pickle / "modelnet40_test_8192pts_fps.dat")
    for i in range(3):
        points, label = dm.dataset("test")[i]
        assert label == labels[i]
        assert points.mean(0).abs().max() < 1e-5
        assert math.isclose(points.norm(dim=1).max().item(), 1.0, abs_tol=1e-5)
        expected = normalize_unit_sphere(torch.from_numpy(clouds[i][:, :3]))
        assert torch.allclose(points, expected)  # xyz only, in the file's (FPS) order


def test_modelnet_pickle_normals_and_subset(mn_pickle):
    dm = ModelNet40DataModule(str(mn_pickle), num_points=32, use_normals=True, batch_size=4)
    points, _ = first_batch(dm, "train")
    assert points.shape == (4, 32, 6)
    test_points, _ = dm.dataset("test")[0]
    assert test_points[:, :3].norm(dim=1).max() <= 1 + 1e-5  # normalised over all 64 points, then the first 32
    assert torch.allclose(test_points[:, 3:].norm(dim=1), torch.ones(32), atol=1e-4)  # normals untouched


def test_modelnet_txt_loads(mn_txt):
    dm = ModelNet40DataModule(str(mn_txt), layout="auto", num_points=64, batch_size=5)
    assert dm.resolved_layout == "txt"
    points, labels = first_batch(dm, "test")
    assert points.shape == (5, 64, 3)
    assert labels.tolist() == [(i * 7 + 3) % 40 for i in range(5)]
    assert points.mean(1).abs().max() < 1e-5
    assert torch.allclose(points.norm(dim=2).amax(1), torch.ones(5), atol=1e-5)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 60 and len(dm.dataset("test")) == 20
    fewer = ModelNet40DataModule(str(mn_txt), layout="txt", num_points=16, use_normals=True)
    assert fewer.dataset("test")[0][0].shape == (16, 6) and fewer.data["train"][0].shape[1] == 20


def test_txt_and_pickle_give_the_same_clouds(tmp_path):
    pickled = write_modelnet40_fixture(tmp_path / "p", "pickle", n_train=20, n_test=10, points=40)
    txt = write_modelnet40_fixture(tmp_path / "t", "txt", n_train=20, n_test=10, points=40)
    a = ModelNet40DataModule(str(pickled), num_points=40).dataset("test")
    b = ModelNet40DataModule(str(txt), num_points=40).dataset("test")
    assert torch.allclose(a.points, b.points, atol=1e-5) and torch.equal(a.labels, b.labels)


# -- protocols ----------------------------------------------------------------------------------------------------
def test_val_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), [20, 30, 10, 40, 2])
    kept, held = stratified_split(labels, 0.1, seed=0)
    assert not set(kept) & set(held) and len(kept) + len(held) == len(labels)
    assert Counter(labels[held].tolist()) == {0: 2, 1: 3, 2: 1, 3: 4, 4: 1}
    again, other = stratified_split(labels, 0.1, seed=0), stratified_split(labels, 0.1, seed=1)
    assert np.array_equal(again[1], held) and not np.array_equal(other[1], held)


def test_final_protocol_carves_val_from_train(scan_root):
    dm = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, val_fraction=0.2, seed=3)
    assert dm.protocol_note is None and dm.has_test_split  # a clean protocol: nothing for the run log to warn
    dm.setup()
    (train, _), (val, val_labels) = dm.data["train"], dm.data["val"]
    assert len(train) + len(val) == 60 and len(val) == 15  # 4 clouds of each of 15 classes, one held out
    assert Counter(val_labels.tolist()) == dict.fromkeys(range(15), 1)
    flat = {tuple(c.flatten()[:6].tolist()) for c in train}
    assert not flat & {tuple(c.flatten()[:6].tolist()) for c in val}  # disjoint clouds
    same = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, val_fraction=0.2, seed=3)
    other = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, val_fraction=0.2, seed=4)
    same.setup(), other.setup()
    assert torch.equal(same.data["val"][0], val) and not torch.equal(other.data["val"][0], val)
    assert not torch.equal(dm.data["val"][0], dm.data["test"][0][: len(val)])


def test_paper_protocol_warns_and_validates_on_test(scan_root, mn_pickle):
    with pytest.warns(UserWarning, match="TEST SPLIT"):
        dm = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, protocol="paper")
    assert "paper" in dm.protocol_note and "test" in dm.protocol_note.lower()
    dm.setup()
    assert len(dm.dataset("train")) == 60
    val, test = dm.dataset("val"), dm.dataset("test")
    assert len(val) == len(test) == 30
    assert all(torch.equal(val[i][0], test[i][0]) and val[i][1] == test[i][1] for i in range(len(val)))
    with pytest.warns(UserWarning, match="TEST SPLIT"):
        ModelNet40DataModule(str(mn_pickle), num_points=32, protocol="paper")


def test_bad_arguments_are_named(scan_root):
    with pytest.raises(KeyError, match="protocol"):
        ScanObjectNNDataModule(str(scan_root), protocol="tune")
    with pytest.raises(KeyError, match="variant"):
        ScanObjectNNDataModule(str(scan_root), variant="OBJ")
    with pytest.raises(KeyError, match="augment"):
        ScanObjectNNDataModule(str(scan_root), augment="jitter")


def test_shots_keep_k_per_class(mn_pickle):
    dm = ModelNet40DataModule(str(mn_pickle), num_points=32, shots=2)
    dm.setup()
    assert Counter(dm.data["train"][1].tolist()) == dict.fromkeys(range(40), 2)


# -- the restricted unpickler -------------------------------------------------------------------------------------
class WritesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class RunsShell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload", [WritesFile, RunsShell])
def test_pickle_with_code_is_refused_without_running_it(tmp_path, payload):
    root = write_modelnet40_fixture(tmp_path / "mn", "pickle", n_train=10, n_test=5, points=16)
    marker = tmp_path / "pwned"
    clouds = [np.zeros((16, 6), np.float32)] * 10
    with open(root / "modelnet40_train_8192pts_fps.dat", "wb") as file:
        pickle.dump([clouds, [np.array([1], np.int32)] * 9 + [payload(marker)]], file)
    dm = ModelNet40DataModule(str(root), num_points=16)
    with pytest.raises(DataError, match="refusing to load") as info:
        dm.setup()
    assert "modelnet40_train_8192pts_fps.dat" in str(info.value)
    assert ("io.open" if payload is WritesFile else "system") in str(info.value)  # builtins.open is io.open
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"points": [], "labels": []}, "holds a dict"),
        ([[np.zeros((8, 6), np.float32)] * 3, [np.array([1], np.int32)] * 2], "3 clouds and 2 labels"),
        ([[[[0.0] * 6] * 8] * 2, [np.array([1], np.int32)] * 2], "not float"),
        ([[np.zeros((8, 6), np.int32)] * 2, [np.array([1], np.int32)] * 2], "not float"),
        ([[np.zeros((8, 6), np.float32)] * 2, ["chair", np.array([1], np.int32)]], "not integer"),
        ([[np.zeros((8, 6), np.float32)] * 2, [np.array([40], np.int32)] * 2], r"outside \[0, 40\)"),
        ([[np.zeros((8, 6), np.float32)]], "1-item list"),
    ],
)
def test_pickle_of_wrong_structure_is_refused(tmp_path, content, match):
    path = tmp_path / "modelnet40_train_8192pts_fps.dat"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=match) as info:
        load_modelnet_pickle(path)
    assert str(path) in str(info.value)


def test_truncated_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "modelnet40_test_8192pts_fps.dat"
    path.write_bytes(pickle.dumps([[np.zeros((8, 6), np.float32)], [np.array([1], np.int32)]])[:-20])
    with pytest.raises(DataError, match="cannot unpickle"):
        load_modelnet_pickle(path)


# -- layout errors ------------------------------------------------------------------------------------------------
def test_scanobjectnn_layout_errors(tmp_path, scan_root):
    with pytest.raises(MissingPointData, match="Expected layout") as info:
        ScanObjectNNDataModule(str(tmp_path / "nowhere"))
    assert isinstance(info.value, FileNotFoundError) and "main_split_nobg/training_objectdataset.h5" in str(info.value)
    write_scanobjectnn_fixture(tmp_path / "bg", "OBJ_BG", n_train=5, n_test=5, points=8)
    with pytest.raises(DataError, match="augmentedrot_scale75.h5") as info:
        ScanObjectNNDataModule(str(tmp_path / "bg"), "PB_T50_RS")
    assert "<root>/main_split/test_objectdataset_augmentedrot_scale75.h5" in str(info.value)


def test_scanobjectnn_wrong_keys_and_shapes(tmp_path):
    import h5py

    root = write_scanobjectnn_fixture(tmp_path, "OBJ_BG", n_train=5, n_test=5, points=8)
    train = root / SCANOBJECTNN_FILES["OBJ_BG"][0]
    with h5py.File(train, "w") as file:
        file.create_dataset("points", data=np.zeros((5, 8, 3), np.float32))
        file.create_dataset("label", data=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"lacks the keys \['data'\]") as info:
        ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=8).setup()
    assert str(train) in str(info.value) and "float [n, P, 3]" in str(info.value)
    with h5py.File(train, "w") as file:
        file.create_dataset("data", data=np.zeros((5, 8, 6), np.float32))
        file.create_dataset("label", data=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"`data` is float32 \[5, 8, 6\]"):
        ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=8).setup()
    with h5py.File(train, "w") as file:
        file.create_dataset("data", data=np.zeros((5, 8, 3), np.float32))
        file.create_dataset("label", data=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="`label` is int64 \\[4\\] for 5 clouds"):
        ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=8).setup()
    train.write_bytes(b"not an h5 file")
    with pytest.raises(DataError, match="not a readable h5 file"):
        ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=8).setup()
    with pytest.raises(DataError, match="fewer than num_points=16"):
        ScanObjectNNDataModule(str(write_scanobjectnn_fixture(tmp_path / "s", "OBJ_BG", 5, 5, 8)), "OBJ_BG", 16).setup()


def test_modelnet_layout_errors(tmp_path, mn_txt):
    with pytest.raises(MissingPointData, match="modelnet40_train_8192pts_fps.dat") as info:
        ModelNet40DataModule(str(tmp_path), layout="pickle")
    assert "<root>/<class>/<shape id>.txt" in str(info.value) and "modelnet40_shape_names.txt" in str(info.value)
    with pytest.raises(MissingPointData, match="neither|nor"):
        ModelNet40DataModule(str(tmp_path))
    root = write_modelnet40_fixture(tmp_path / "txt", "txt", n_train=10, n_test=5, points=16)
    first = (root / "modelnet40_train.txt").read_text().split()[0]
    (root / first.rsplit("_", 1)[0] / f"{first}.txt").unlink()
    with pytest.raises(DataError, match="missing shape files") as info:
        ModelNet40DataModule(str(root), num_points=16).setup()
    assert f"{first}.txt (modelnet40_train.txt:1)" in str(info.value) and "Expected layout" in str(info.value)


# -- augmentations ------------------------------------------------------------------------------------------------
def cloud(n: int = 100, seed: int = 0, columns: int = 3) -> torch.Tensor:
    return torch.randn(n, columns, generator=torch.Generator().manual_seed(seed))


def test_rotate_up_turns_about_y_only():
    points = cloud(columns=6)
    points[:, 3:] = torch.nn.functional.normalize(points[:, 3:], dim=1)
    rotated = RotateUp(scale=(1.0, 1.0))(points, torch.Generator().manual_seed(0))
    assert torch.allclose(rotated[:, :3].norm(dim=1), points[:, :3].norm(dim=1), atol=1e-5)
    assert torch.equal(rotated[:, 1], points[:, 1]) and not torch.allclose(rotated[:, 0], points[:, 0])
    assert torch.allclose(rotated[:, 3:].norm(dim=1), torch.ones(100), atol=1e-5)
    angles = []
    for seed in range(200):
        out = RotateUp(scale=(1.0, 1.0))(torch.tensor([[1.0, 0.0, 0.0]]), torch.Generator().manual_seed(seed))
        angles.append(math.atan2(-out[0, 2].item(), out[0, 0].item()))
    assert min(angles) < -2.5 and max(angles) > 2.5  # uniform over [-pi, pi]
    scaled = RotateUp()(points, torch.Generator().manual_seed(1))
    ratio = scaled[:, 1] / points[:, 1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4) and 0.9 <= ratio[0] <= 1.1


def test_scale_and_translate_stay_within_bounds():
    unit = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    transform = ScaleAndTranslate()
    for seed in range(100):
        out = transform(unit, torch.Generator().manual_seed(seed))
        shift, scale = out[0], out[1] - out[0]
        assert (shift.abs() <= 0.2 + 1e-6).all()
        assert (scale >= 2 / 3 - 1e-6).all() and (scale <= 1.5 + 1e-6).all()
    normals = cloud(columns=6)
    assert torch.equal(transform(normals, torch.Generator().manual_seed(0))[:, 3:], normals[:, 3:])


@pytest.mark.parametrize("name", ["scale_translate", "rotate", "none"])
def test_augmentations_are_deterministic_given_the_seed(name):
    transform, points = build_augment(name), cloud()
    a = transform(points, torch.Generator().manual_seed(7))
    b = transform(points, torch.Generator().manual_seed(7))
    c = transform(points, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and (name == "none" or not torch.equal(a, c))


def test_random_subset_draws_from_the_pool_in_random_order():
    points = torch.arange(12.0)[:, None].expand(12, 3)
    out = RandomSubset(8, 10)(points, torch.Generator().manual_seed(0))
    values = out[:, 0].long().tolist()
    assert len(set(values)) == 8 and max(values) < 10 and values != sorted(values)


def test_training_items_are_shuffled_and_repeat_under_the_run_seed(scan_root):
    dm = ScanObjectNNDataModule(str(scan_root), "OBJ_BG", num_points=64, augment="none")
    train = dm.dataset("train")
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    b, c = train[0][0], train[0][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    stored = dm.data["train"][0][0]
    assert not torch.equal(a, stored)  # shuffled ...
    assert torch.equal(a[a[:, 0].argsort()], stored[stored[:, 0].argsort()])  # ... the same 64 points


# -- voting -------------------------------------------------------------------------------------------------------
def test_voting_yields_distinct_reproducible_copies(mn_pickle):
    dm = ModelNet40DataModule(str(mn_pickle), num_points=32, votes=4, batch_size=3)
    points, labels = first_batch(dm, "test")
    assert points.shape == (3, 4, 32, 3) and labels.shape == (3,)
    copies = points[0]
    assert all(not torch.equal(copies[i], copies[j]) for i in range(4) for j in range(i + 1, 4))
    again, _ = first_batch(dm, "test")
    assert torch.equal(points, again)  # seeded per (seed, item): the same votes every evaluation
    val, _ = first_batch(dm, "val")
    assert val.shape == (3, 32, 3)  # validation never votes
    logits = vote_logits(lambda x: x.mean(dim=1), points)  # a "model" whose logits are the mean point
    assert logits.shape == (3, 3) and torch.allclose(logits, points.mean(dim=2).mean(dim=1), atol=1e-6)
    assert torch.equal(vote_logits(lambda x: x.mean(dim=1), val), val.mean(dim=1))


# -- a final training batch of one never reaches the BatchNorm head ---------------------------------------------
def _fit_scan(root, tmp_path, *extra: str):
    """One epoch of the shipped ScanObjectNN linear-probe recipe (MLP-BN head) on a tiny transformer, batch 4;
    returns the CLI and the batch sizes the head trained on."""
    from mmpeft.cli import run_cli

    b, d = "--model.init_args.backbone.init_args", "--data.init_args"
    tiny = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32)
    cli = run_cli([
        "-c", "configs/point/scanobjectnn/linear.yaml", *(f"{b}.{k}={v}" for k, v in tiny.items()),
        f"{b}.pointnet_widths=[16, 32, 64]", f"{d}.root={root}", f"{d}.variant=OBJ_BG", f"{d}.num_points=64",
        f"{d}.batch_size=4", f"{d}.num_workers=0", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", f"--run.dir={tmp_path}",
        "--run.wandb=disabled", "--run.test_after_fit=false", *extra,
    ], run=False)  # fmt: skip
    sizes: list[int] = []
    cli.model.model.head.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, sizes


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_final_training_batch_of_one_never_reaches_the_batchnorm_head(scan_root, tmp_path, drop_last):
    """45 training clouds at batch 4 leave one over (15-shot ScanObjectNN at batch 32 is the same case): the
    recipe drops it, as Point-MAE's loader does; drop_last false folds it into the batch before."""
    cli, sizes = _fit_scan(scan_root, tmp_path, f"--data.init_args.drop_last={str(drop_last).lower()}")
    assert len(cli.datamodule.data["train"][1]) == 45 and 45 % 4 == 1
    assert isinstance(cli.model.model.head[1], torch.nn.BatchNorm1d), "the papers' MLP-BN head trains"
    assert sizes == ([4] * 11 if drop_last else [4] * 10 + [5]), "no batch of one; folded, every cloud kept"
    assert cli.trainer.global_step == 11 and int(cli.model.model.head[1].num_batches_tracked) == 11


# -- data the backbone cannot take are refused when model and data meet, before any forward ----------------------
def _run_point(config: str, data: list[str], tmp_path, stage: str = "fit", forwards: list | None = None, **backbone):
    """Fit (or test) a tiny point transformer on fixture data; `forwards` records every backbone forward."""
    from mmpeft.cli import run_cli

    tiny = {"num_points": 64, "num_group": 8, "group_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 4,
            "encoder_dims": 32, **backbone}  # fmt: skip
    b = "--model.init_args.backbone.init_args"
    cli = run_cli([
        "-c", config, *(f"{b}.{k}={v}" for k, v in tiny.items()), f"{b}.pointnet_widths=[16, 32, 64]",
        *(f"--data.init_args.{option}" for option in data), "--data.init_args.num_workers=0",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--run.dir={tmp_path}", "--run.wandb=disabled", "--run.test_after_fit=false",
    ], run=False)  # fmt: skip
    forwards = [] if forwards is None else forwards
    cli.model.model.backbone.register_forward_pre_hook(lambda module, args: forwards.append(len(args[0])))
    getattr(cli.trainer, stage)(cli.model, datamodule=cli.datamodule)
    return forwards


def test_normals_for_an_xyz_backbone_are_refused_before_the_first_forward(mn_pickle, tmp_path):
    data = [f"root={mn_pickle}", "num_points=64", "use_normals=true", "batch_size=8"]
    forwards: list[int] = []
    with pytest.raises(ConfigMismatch, match=r"6 channels \(xyz \+ normals.*point_mae backbone takes 3 \(xyz\); "
                       r"set --data.init_args.use_normals false"):  # fmt: skip
        _run_point("configs/point/modelnet40/linear.yaml", data, tmp_path, forwards=forwards)
    assert forwards == [], "refused before any forward"
    assert _run_point("configs/point/modelnet40/linear.yaml", data[:2] + data[3:], tmp_path), "xyz clouds train"


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_clouds_smaller_than_the_grouping_are_refused_before_the_first_forward(scan_root, tmp_path, stage):
    data = [f"root={scan_root}", "variant=OBJ_BG", "num_points=24", "batch_size=8"]
    forwards: list[int] = []
    match = (r"num_points=24 points, but the point_mae backbone groups each cloud into num_group=8 FPS centres of "
             r"group_size=32 .* at least 32; raise --data.init_args.num_points or lower "
             r"--model.init_args.backbone.init_args.group_size")  # fmt: skip
    with pytest.raises(ConfigMismatch, match=match):
        _run_point("configs/point/scanobjectnn/linear.yaml", data, tmp_path, stage, forwards, group_size=32)
    assert forwards == [], "refused before any forward"
