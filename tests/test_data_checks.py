"""Bad data is found before training, in one error that names every bad entry once (image-list, VTAB-1k, FGVC)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

from mmpeft.core.errors import MmpeftError
from mmpeft.data import FGVCDataModule, ImageListDataModule, VTAB1kDataModule
from mmpeft.data.checks import MAX_LISTED, DataError, image_problem
from mmpeft.data.fixtures import write_vtab_fixture
from mmpeft.data.image_list import read_list
from tests.test_benchmark_data import write_fgvc


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    """A real JPEG of noise: its scan data is most of the file, so cutting it in half keeps the header whole."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def truncate(path) -> None:
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def pristine_vtab(tmp_path_factory):
    return write_vtab_fixture(tmp_path_factory.mktemp("vtab"), ["eurosat"], test_size=20, size=8)


@pytest.fixture
def vtab(pristine_vtab, tmp_path):
    """A fresh copy of a EuroSAT task in NOAH's layout (800 / 200 / 1000 / 20 lines, 10 classes)."""
    shutil.copytree(pristine_vtab, tmp_path / "vtab")
    return tmp_path / "vtab"


def edit_line(path, index: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = line
    path.write_text("\n".join(lines) + "\n")


def test_truncated_jpeg_passes_the_header_check_and_fails_a_full_decode(tmp_path):
    """The premise of `verify`: `Image.open` reads only the header, so only `load()` finds a cut-off JPEG."""
    truncate(tmp_path / "cut.jpg")
    assert image_problem(tmp_path / "cut.jpg") is None
    kind, detail = image_problem(tmp_path / "cut.jpg", full=True)
    assert kind == "unreadable images" and "truncated" in detail


def test_vtab_every_problem_in_one_error_when_built(vtab):
    task = vtab / "eurosat"
    trainval = task / "train800val200.txt"
    edit_line(trainval, 3, "images/train800val200/000003.jpg seven")  # malformed: line 4
    edit_line(trainval, 10, "images/train800val200/000010.jpg 12")  # label out of [0, 10): line 11
    (task / "images/train800val200/000020.jpg").unlink()  # missing: line 21
    (task / "images/test/000001.jpg").write_text("not an image")  # text named .jpg: test.txt line 2
    truncate(task / "images/test/000005.jpg")  # header fine, pixels cut: only verify finds it
    with pytest.raises(DataError) as caught:
        VTAB1kDataModule(str(vtab), "eurosat", "final", num_workers=0)
    message = str(caught.value)
    assert isinstance(caught.value, MmpeftError) and isinstance(caught.value, ValueError)
    assert "4 problems in the data, found before training" in message
    named = {
        "train800val200.txt:4: expected '<relative/path> <integer label>', got": 1,
        "train800val200.txt:11: label 12": 1,
        "labels outside [0, 10)": 1,
        "images/train800val200/000020.jpg (train800val200.txt:21): no such file": 1,
        "images/test/000001.jpg (test.txt:2): PIL cannot identify": 1,
        "images/test/000005.jpg": 0,
        "Expected layout:\n    <root>/<task>/train800.txt": 1,
        "--data.init_args.verify true": 1,
    }
    assert {text: message.count(text) for text in named} == named, message
    with pytest.raises(DataError) as caught:
        VTAB1kDataModule(str(vtab), "eurosat", "final", num_workers=0, verify=True)
    message = str(caught.value)
    assert "5 problems" in message and message.count("images/test/000005.jpg (test.txt:6): OSError") == 1
    assert "truncated" in message and "verify true" not in message


def test_image_problems_stop_the_fit_before_its_first_step(vtab):
    task = vtab / "eurosat"
    (task / "images/train800val200/000007.jpg").unlink()
    (task / "images/val200/000002.jpg").write_bytes(b"GIF89a but not really")
    truncate(task / "images/train800val200/000009.jpg")
    dm = VTAB1kDataModule(str(vtab), "eurosat", "final", image_size=8, batch_size=8, num_workers=0)  # lists are fine
    steps = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, _):
            steps.append(1)
            return self.layer(torch.ones(1, 1)).sum()

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with pytest.raises(DataError) as caught:
        trainer.fit(Probe(), datamodule=dm)
    message = str(caught.value)
    assert not steps, "setup runs before the first step"
    assert "2 problems" in message and "missing images: 1, files that are not images: 1" in message
    assert "000007.jpg (train800val200.txt:8)" in message and "val200/000002.jpg (val200.txt:3)" in message
    with pytest.raises(DataError, match=r"3 problems[\s\S]*000009.jpg \(train800val200.txt:10\): OSError"):
        VTAB1kDataModule(str(vtab), "eurosat", "final", num_workers=0, verify=True).setup("fit")


def test_the_verify_flag_from_the_command_line(vtab, tmp_path, capsys):
    from mmpeft.cli import main

    truncate(vtab / "eurosat/images/train800/000011.jpg")
    config = {
        "model": {
            "class_path": "mmpeft.tasks.ImageClassification",
            "init_args": {"backbone": {"class_path": "tests.toys.ToyDigitsBN"}, "method": "linear"},
        },
        "data": {"class_path": "mmpeft.data.VTAB1kDataModule", "init_args": {"root": str(vtab), "task": "eurosat"}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "run": {"dir": str(tmp_path / "runs"), "name": "t", "wandb": "disabled"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "-c", str(tmp_path / "config.yaml"), "--data.init_args.num_workers=0"]
    assert main([*args, "--data.init_args.verify", "true"]) == 2
    err = capsys.readouterr().err
    assert "mmpeft: error: VTAB-1k eurosat (tune protocol)" in err
    assert "images/train800/000011.jpg (train800.txt:12): OSError: image file is truncated" in err
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "nothing was trained"


def test_empty_splits_are_named_not_reported_as_label_errors(vtab, tmp_path):
    (vtab / "eurosat/test.txt").write_text("")
    with pytest.raises(DataError, match=r"1 problem in[\s\S]*test.txt: the test split lists no images"):
        VTAB1kDataModule(str(vtab), "eurosat", "final", num_workers=0)
    VTAB1kDataModule(str(vtab), "eurosat", "tune", num_workers=0).setup("fit")  # "tune" uses no test split
    root = tmp_path / "list"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "images/a.png")
    (root / "train.txt").write_text("\n\n")
    (root / "val.txt").write_text("images/a.png 0\n")
    (root / "test.txt").write_text("images/a.png 1\n")
    with pytest.raises(DataError) as caught:
        ImageListDataModule(str(root), num_workers=0)
    message = str(caught.value)
    assert "train.txt: the train split lists no images" in message and "labels outside" not in message


def test_image_list_names_each_bad_entry_once(tmp_path):
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(4):
        Image.new("RGB", (6, 6), (60 * i, 0, 0)).save(tmp_path / f"images/img {i}.png")  # spaces in paths
        lines.append(f"images/img {i}.png {i % 2}")
    lines.append("images/gone.png 1")
    for split in ("train", "val", "test"):  # the same list three times: gone.png is one bad file
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        ImageListDataModule(str(tmp_path), num_workers=0).setup("fit")
    message = str(caught.value)
    assert "1 problem in" in message and message.count("gone.png") == 1 and "(train.txt:5): no such file" in message


def test_long_listings_are_capped(vtab):
    for i in range(30):
        (vtab / f"eurosat/images/train800/{i:06d}.jpg").unlink()
    with pytest.raises(DataError) as caught:
        VTAB1kDataModule(str(vtab), "eurosat", num_workers=0).setup("fit")
    message = str(caught.value)
    assert "30 problems" in message and f"... and {30 - MAX_LISTED} more" in message
    assert message.count("no such file") == MAX_LISTED


def test_fgvc_malformed_json_and_labels_are_named_in_one_error(tmp_path):
    splits = write_fgvc(tmp_path)
    (tmp_path / "val.json").write_text('{"001.class_0/val_0.jpg": 1,}')
    (tmp_path / "test.json").write_text('["not", "an", "object"]')
    train = json.loads((tmp_path / "train.json").read_text())
    train["000.class_0/train_0.jpg"] = None
    (tmp_path / "train.json").write_text(json.dumps(train))
    with pytest.raises(DataError) as caught:
        FGVCDataModule(str(tmp_path), "cub", num_workers=0)
    message = str(caught.value)
    assert "3 problems" in message
    assert "  val.json: not valid JSON (" in message and "line 1 column 29" in message  # where json stopped
    assert "  test.json: must hold one JSON object mapping image paths to labels, not a list" in message
    assert '  train.json["000.class_0/train_0.jpg"]: label None' in message
    assert "Expected layout:\n    <root>/train.json" in message
    for split in ("val", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps(splits[split]))
    (tmp_path / "train.json").write_text('{"000.class_0/train_0.jpg": 1')
    with pytest.raises(DataError, match=r"\(malformed split files: 1\)\n  train.json: not valid JSON") as caught:
        FGVCDataModule(str(tmp_path), "cub", num_workers=0)
    assert "1 problem in" in str(caught.value), "no label of val.json is blamed for the broken train.json"


def test_fgvc_unknown_labels_empty_splits_and_images(tmp_path):
    write_fgvc(tmp_path)
    val = json.loads((tmp_path / "val.json").read_text())
    val.update({"extra.jpg": 999, "more.jpg": 998})
    (tmp_path / "val.json").write_text(json.dumps(val))
    (tmp_path / "test.json").write_text("{}")
    with pytest.raises(DataError) as caught:
        FGVCDataModule(str(tmp_path), "cub", "final", num_workers=0)
    message = str(caught.value)
    assert "labels that train.json lacks: 2" in message and 'val.json["more.jpg"]: label 998' in message
    assert "test.json: the test split lists no images" in message
    (tmp_path / "val.json").write_text(json.dumps({k: v for k, v in val.items() if v < 900}))
    dm = FGVCDataModule(str(tmp_path), "cub", "tune", num_workers=0)  # "tune" does not use test.json
    (tmp_path / "images/004.class_4/train_1.jpg").unlink()
    (tmp_path / "images/005.class_5/val_0.jpg").write_text("<html>404</html>")
    with pytest.raises(DataError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert "2 problems" in message and "004.class_4/train_1.jpg (train.json): no such file" in message
    assert "005.class_5/val_0.jpg (val.json): PIL cannot identify" in message
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(DataError, match=r"1 problem in[\s\S]*/images: the image folder does not exist"):
        FGVCDataModule(str(tmp_path), "cub", num_workers=0).setup("fit")


def test_fgvc_verify_finds_truncated_images(tmp_path):
    write_fgvc(tmp_path)
    truncate(tmp_path / "images/010.class_10/train_0.jpg")
    FGVCDataModule(str(tmp_path), "cub", num_workers=0).setup("fit")  # the header opens
    with pytest.raises(DataError, match=r"1 problem[\s\S]*010.class_10/train_0.jpg \(train.json\): OSError"):
        FGVCDataModule(str(tmp_path), "cub", num_workers=0, verify=True).setup("fit")


def test_a_bad_image_at_load_time_names_its_path(vtab):
    truncate(vtab / "eurosat/images/train800/000004.jpg")
    dm = VTAB1kDataModule(str(vtab), "eurosat", image_size=8, num_workers=0)
    dm.setup("fit")  # the header check passes
    with pytest.raises(DataError) as caught:
        dm.dataset("train")[4]
    message = str(caught.value)
    assert "cannot read image" in message and "eurosat/images/train800/000004.jpg" in message
    assert "truncated" in message and "verify: true" in message
    assert isinstance(caught.value.__cause__, OSError)


def test_read_list_names_every_malformed_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 1\nb.jpg\n\nc d.jpg x\ne.jpg 2\n")
    with pytest.raises(DataError) as caught:
        read_list(tmp_path / "list.txt")
    message = str(caught.value)
    assert "malformed lines: 2" in message and "list.txt:2: expected" in message and "list.txt:4: expected" in message
    (tmp_path / "list.txt").write_text("a.jpg 1\nc d.jpg 0\n")
    assert read_list(tmp_path / "list.txt") == [("a.jpg", 1), ("c d.jpg", 0)]
