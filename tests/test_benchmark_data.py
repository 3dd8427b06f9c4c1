"""VTAB-1k and FGVC loaders on fixture folders written in the true on-disk formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.core.errors import UnknownName
from mmpeft.data import FGVCDataModule, VTAB1kDataModule
from mmpeft.data.fgvc import make_splits, verify_splits
from mmpeft.data.vtab import vtab_tasks

SIZES = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 30}


def write_vtab_task(root, folder="dtd", classes=47):
    """NOAH's dump: one folder of JPEG copies per split, lines 'images/<split>/<6 digits>.jpg <label>'."""
    rng = np.random.default_rng(0)
    tiny = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    labels = {
        "train800": [(i * 7) % classes for i in range(800)],
        "val200": [(i * 3 + 1) % classes for i in range(200)],
    }
    labels["train800val200"] = labels["train800"] + labels["val200"]  # the dump's copies of both
    labels["test"] = [i % classes for i in range(SIZES["test"])]
    for split, n in SIZES.items():
        (root / folder / "images" / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            tiny.save(root / folder / rel)
            lines.append(f"{rel} {labels[split][i]}")
        (root / folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab-1k")
    write_vtab_task(root)
    return root


def test_vtab_metadata_covers_all_19_tasks():
    tasks = vtab_tasks()
    assert len(tasks) == 19 and sum(t["classes"] for t in tasks.values()) == 940
    groups = [t["group"] for t in tasks.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    for name, t in tasks.items():
        if t["group"] != "structured" or name == "clevr_count":
            assert len(t["class_names"]) == t["classes"], f"{name}: names for every class, in label order"
        else:
            assert t["class_names"] is None, f"{name}: binned labels have no names"


def test_vtab_protocols_split_sizes_and_labels(vtab_root):
    tune = VTAB1kDataModule(str(vtab_root), "dtd", "tune", image_size=32, batch_size=16, num_workers=0)
    final = VTAB1kDataModule(str(vtab_root), "dtd", "final", image_size=32, batch_size=16, num_workers=0)
    assert {k: len(v) for k, v in tune.items.items()} == {"train": 800, "val": 200}
    assert {k: len(v) for k, v in final.items.items()} == {"train": 1000, "val": 200, "test": 30}
    assert tune.num_classes == 47 and tune.group == "natural"
    labels = [label for _, label in final.items["train"]]
    assert 0 <= min(labels) and max(labels) < 47
    trainval = sorted(labels)
    assert trainval == sorted([label for _, label in tune.items["train"]] + [label for _, label in tune.items["val"]])
    images, targets = next(iter(final.test_dataloader()))
    assert images.shape == (16, 3, 32, 32) and targets.dtype == torch.long
    with pytest.raises(ValueError, match="'tune' protocol has no test split"):
        tune.test_dataloader()


def test_vtab_preprocessing_normalises_as_configured(tmp_path):
    write_vtab_task(tmp_path, "eurosat", classes=10)
    gray = Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))
    gray.save(tmp_path / "eurosat/images/test/000000.jpg")
    dm = VTAB1kDataModule(str(tmp_path), "eurosat", "final", image_size=224, num_workers=0,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # fmt: skip
    image, _ = dm.dataset("test")[0]
    assert image.shape == (3, 224, 224)
    assert torch.allclose(image, torch.full_like(image, 128 / 255 * 2 - 1), atol=2 / 255)


def test_vtab_bad_input(vtab_root, tmp_path):
    with pytest.raises(UnknownName, match="unknown VTAB-1k task 'cifar10'"):
        VTAB1kDataModule(str(vtab_root), "cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist. Expected layout"):
        VTAB1kDataModule(str(vtab_root), "svhn")
    write_vtab_task(tmp_path, "kitti", classes=4)
    lines = (tmp_path / "kitti/train800.txt").read_text().splitlines()[:700]
    (tmp_path / "kitti/train800.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="has 700 lines, VTAB-1k's train800 has 800"):
        VTAB1kDataModule(str(tmp_path), "kitti")


def write_fgvc(root, classes=200, labels_from=1):
    (root / "images").mkdir(parents=True)
    tiny = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    split_items = {}
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        items = {}
        for c in range(classes):
            for k in range(per_class):
                rel = f"{c:03d}.class_{c}/{split}_{k}.jpg"
                (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                tiny.save(root / "images" / rel)
                items[rel] = c + labels_from
        (root / f"{split}.json").write_text(json.dumps(items))
        split_items[split] = items
    return split_items


def test_fgvc_class_map_comes_from_train_and_is_shared(tmp_path):
    write_fgvc(tmp_path)
    dm = FGVCDataModule(str(tmp_path), "cub", "final", image_size=32, batch_size=8, num_workers=0)
    assert dm.num_classes == 200 and dm.class_map[1] == 0 and dm.class_map[200] == 199
    assert {k: len(v) for k, v in dm.items.items()} == {"train": 400, "val": 200, "test": 200}
    assert len(dm.train_dataloader().dataset) == 600, "final protocol trains on train + val"
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.max() < 200


def test_fgvc_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Expected layout"):
        FGVCDataModule(str(tmp_path / "nope"))
    write_fgvc(tmp_path, classes=120)
    with pytest.raises(ValueError, match="has 120 classes, CUB-200-2011 has 200"):
        FGVCDataModule(str(tmp_path), "cub")
    with pytest.raises(UnknownName, match="unknown FGVC dataset"):
        FGVCDataModule(str(tmp_path), "aircraft")
    val = json.loads((tmp_path / "val.json").read_text())
    val["extra.jpg"] = 999
    (tmp_path / "val.json").write_text(json.dumps(val))
    with pytest.raises(ValueError, match="labels that train.json lacks"):
        FGVCDataModule(str(tmp_path), "dogs")


def test_split_generator_is_deterministic_with_md5_checks(tmp_path):
    train = {f"images/{c}/{k}.jpg": c for c in range(20) for k in range(10)}
    test = {f"images/{c}/t{k}.jpg": c for c in range(20) for k in range(3)}
    first = make_splits(train, test, tmp_path / "a", seed=42)
    second = make_splits(dict(reversed(list(train.items()))), test, tmp_path / "b", seed=42)
    assert first == second, "same inputs and seed -> byte-identical files"
    assert first != make_splits(train, test, tmp_path / "c", seed=7)
    val = json.loads((tmp_path / "a/val.json").read_text())
    assert len(val) == 20 and not set(val) & set(json.loads((tmp_path / "a/train.json").read_text()))
    verify_splits(tmp_path / "a")
    (tmp_path / "a/val.json").write_text("{}")
    with pytest.raises(ValueError, match="does not match its md5"):
        verify_splits(tmp_path / "a")


def test_fgvc_and_vtab_few_shot_subsets(tmp_path, vtab_root):
    write_fgvc(tmp_path)
    dm = FGVCDataModule(str(tmp_path), "cub", shots=1, shot_seed=3, num_workers=0)
    labels = [label for _, label in dm.items["train"]]
    assert sorted(labels) == list(range(200)) and len(dm.items["val"]) == 200
    again = FGVCDataModule(str(tmp_path), "cub", shots=1, shot_seed=3, num_workers=0)
    assert dm.items["train"] == again.items["train"]
    vtab = VTAB1kDataModule(str(vtab_root), "dtd", "final", shots=4, num_workers=0)
    assert len(vtab.items["train"]) == 4 * 47 and len(vtab.items["test"]) == 30


def test_fgvc_metadata_class_names():
    from mmpeft.data.metadata import load_metadata

    meta = load_metadata("fgvc")["datasets"]
    assert len(meta["cub"]["class_names"]) == 200 and meta["cub"]["class_names"][0] == "Black footed Albatross"
    assert len(meta["flowers"]["class_names"]) == 102
    assert len(meta["dogs"]["class_names"]) == 120 and meta["dogs"]["class_names"][0] == "Chihuahua"
    assert (
        len(meta["cars"]["class_names"]) == 196 and meta["cars"]["class_names"][-1] == "smart fortwo Convertible 2012"
    )
    assert "class_names" not in meta["nabirds"] and meta["nabirds"]["class_names_file"] == "classes.txt"


def write_nabirds_lists(root, label_as="class id"):
    """NABirds' real layout, lists only: classes.txt names all hierarchy nodes (internal ones too), images sit
    in zero-padded class-id folders, and VPT-style json files map those paths to labels."""
    leaf_ids = [295 + 2 * i for i in range(555)]
    lines = ["0 Birds", "1 Ducks, Geese, and Swans", "2 Grebes"]
    lines += [f"{c} Species {c} (Adult, subadult)" for c in leaf_ids] + ["1010 Wrens"]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        items = {
            f"{c:04d}/{split}{k}.jpg": (c if label_as == "class id" else index)
            for index, c in enumerate(leaf_ids)
            for k in range(per_class)
        }
        (root / f"{split}.json").write_text(json.dumps(items))
    return leaf_ids


@pytest.mark.parametrize("label_as", ["class id", "index"])
def test_nabirds_class_names_come_from_its_classes_txt_through_image_folders(tmp_path, label_as):
    from mmpeft.tasks.clip import resolve_class_names

    leaf_ids = write_nabirds_lists(tmp_path, label_as)
    dm = FGVCDataModule(str(tmp_path), "nabirds", num_workers=0)
    names = dm.class_names
    assert len(names) == dm.num_classes == 555
    assert names[0] == "Species 295 (Adult, subadult)" and names[-1] == f"Species {leaf_ids[-1]} (Adult, subadult)"
    assert "Birds" not in names and "Wrens" not in names, "internal hierarchy nodes are never classes"
    assert resolve_class_names(f"fgvc:nabirds@{tmp_path}") == names
    label_of_eighth = leaf_ids[7] if label_as == "class id" else 7
    assert names[dm.class_map[label_of_eighth]] == f"Species {leaf_ids[7]} (Adult, subadult)"


def test_nabirds_class_names_bad_input(tmp_path):
    from mmpeft.tasks.clip import resolve_class_names

    with pytest.raises(ValueError, match="class_names: 'fgvc:nabirds@<dataset folder>'"):
        resolve_class_names("fgvc:nabirds")
    with pytest.raises(ValueError, match="vtab1k:eurosat reads no class file from a dataset folder; drop '@"):
        resolve_class_names(f"vtab1k:eurosat@{tmp_path}")
    write_nabirds_lists(tmp_path)
    train = json.loads((tmp_path / "train.json").read_text())
    train["0297/stray.jpg"] = 295  # one label in two class folders
    (tmp_path / "train.json").write_text(json.dumps(train))
    with pytest.raises(ValueError, match="label 295 lies in folders"):
        resolve_class_names(f"fgvc:nabirds@{tmp_path}")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt is missing: it ships with the dataset download"):
        resolve_class_names(f"fgvc:nabirds@{tmp_path}")
    (tmp_path / "classes.txt").write_text("Birds without an id\n")
    with pytest.raises(ValueError, match="expected '<class id> <name>'"):
        resolve_class_names(f"fgvc:nabirds@{tmp_path}")
