"""Captioned fine-tuning in the `imagefolder` layout and class-conditional DiT fine-tuning on class folders (issue
24 item 3): the layouts, caption templates and dropout, bad metadata named line by line, and both shipped configs
training end to end on the tiny SD / DiT with a lower fixed-noise validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.cli import run_cli
from mmpeft.data import CaptionedImagesDataModule, ClassFolderDataModule
from mmpeft.data.checks import DataError
from mmpeft.data.sampling import ItemDraw, SeededItems

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def _image(path: Path, seed: int, size: tuple[int, int] = (72, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captioned")
    rows = []
    for i in range(8):
        _image(root / "images" / f"{i:04d}.png", i)
        rows.append(json.dumps({"file_name": f"images/{i:04d}.png", "text": f"bird {i}", "other": 1}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    for c, name in enumerate(["cat", "dog"]):
        for i in range(4):
            _image(root / "train" / name / f"{i}.png", 10 * c + i)
    return root


def test_captions_come_from_metadata_jsonl_with_a_template(captioned):
    data = CaptionedImagesDataModule(str(captioned), template="a photo of {}", image_size=32, batch_size=4)
    assert [c for _, c in data.items["train"]][:2] == ["a photo of bird 0", "a photo of bird 1"]
    assert len(data.items["val"]) == 4, "no validation folder: training images spread over the split"
    images, captions = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and all(c.startswith("a photo of bird") for c in captions)
    assert data.num_classes is None


def test_train_and_validation_folders_are_read_as_the_hub_lays_them_out(captioned, tmp_path):
    for split, count in (("train", 3), ("validation", 2)):
        for i in range(count):
            _image(tmp_path / split / f"{i}.png", i)
        rows = [json.dumps({"image": f"{i}.png", "caption": f"{split} {i}"}) for i in range(count)]
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(rows))
    data = CaptionedImagesDataModule(str(tmp_path), image_column="image", caption_column="caption", image_size=16)
    assert [c for _, c in data.items["train"]] == ["train 0", "train 1", "train 2"]
    assert [c for _, c in data.items["val"]] == ["validation 0", "validation 1"]


def test_caption_dropout_blanks_that_share_of_training_captions_seeded_per_item(captioned):
    data = CaptionedImagesDataModule(str(captioned), caption_dropout=0.5, image_size=16)
    train = SeededItems(data.train_dataset())
    draws = [train[ItemDraw(i % 8, seed)][1] for seed in range(50) for i in range(8)]
    blank = sum(c == "" for c in draws) / len(draws)
    assert 0.4 < blank < 0.6, blank
    assert [train[ItemDraw(3, 7)][1] for _ in range(3)] == [train[ItemDraw(3, 7)][1]] * 3, "the same draw each time"
    val = next(iter(data.val_dataloader()))[1]
    assert "" not in val, "validation keeps every caption"


def test_bad_metadata_is_named_line_by_line(tmp_path):
    _image(tmp_path / "a.png", 0)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\nnot json\n{"file_name": "missing.png", "text": "x"}\n{"text": "y"}\n'
    )
    with pytest.raises(DataError) as err:
        CaptionedImagesDataModule(str(tmp_path))
    message = str(err.value)
    assert "line 2: not JSON" in message and "line 3: 'missing.png' is not a file" in message
    assert "line 4: no 'file_name'" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.jsonl"):
        CaptionedImagesDataModule(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="must hold"):
        CaptionedImagesDataModule(str(tmp_path), template="a photo")


def test_class_folders_give_sorted_labels_and_a_class_count(class_folders, tmp_path):
    data = ClassFolderDataModule(str(class_folders), image_size=16, batch_size=8, val_count=2)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    labels = sorted(label for _, label in data.items["train"])
    assert labels == [0] * 4 + [1] * 4 and sorted(label for _, label in data.items["val"]) == [0, 1]
    images, batch_labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and batch_labels.dtype == torch.int64
    (tmp_path / "train" / "bird").mkdir(parents=True)
    with pytest.raises(DataError, match="class folders without images"):
        ClassFolderDataModule(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "layout"),
    [("configs/diffusion/captions_lora.yaml", "captioned"), ("configs/diffusion/difffit_dit_folders.yaml", "folders")],
)
def test_the_shipped_workflow_configs_lower_the_validation_loss(config, layout, captioned, class_folders, tmp_path):
    root = captioned if layout == "captioned" else class_folders
    lr = ["--model.init_args.lr=0.001"] if "lora" in config else []  # three tiny epochs show it at DiffFit's lr
    args = ["-c", str(ROOT / config), f"--data.init_args.root={root}", f"--run.dir={tmp_path}", *QUICK,
            "--trainer.max_epochs=3", *lr]  # fmt: skip
    cli = run_cli(args, run=False)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    assert after < before, f"{config}: val/loss {before:.5f} -> {after:.5f}"
