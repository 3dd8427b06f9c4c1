"""Every data module that reads a public or user dataset names its own files and its `datasets/` page when the
data is missing (issue 22 item 16): a VTAB-1k or CLIP config without data showed the generic image-list layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmpeft.cli import main
from mmpeft.data import (
    FGVCDataModule,
    ImageListDataModule,
    ModelNet40DataModule,
    ScanObjectNNDataModule,
    VTAB1kDataModule,
)

REPO = Path(__file__).resolve().parents[1]

# (data module, extra arguments, its page, files its error must name, files of other layouts it must not name)
CASES = {
    "image_list": (ImageListDataModule, {}, "image_list.md", ["train.txt", "val.txt"], ["train800"]),
    "vtab1k": (
        VTAB1kDataModule,
        {"task": "eurosat"},
        "vtab1k.md",
        ["train800.txt", "val200.txt", "train800val200.txt"],
        ["<root>/train.txt", "      train.txt"],
    ),
    "fgvc": (FGVCDataModule, {"dataset": "cub"}, "fgvc.md", ["train.json", "val.json", "test.json"], ["train.txt"]),
    "scanobjectnn": (
        ScanObjectNNDataModule,
        {},
        "scanobjectnn.md",
        ["training_objectdataset_augmentedrot_scale75.h5", "main_split_nobg"],
        ["train.txt"],
    ),
    "modelnet40": (
        ModelNet40DataModule,
        {},
        "modelnet40.md",
        ["modelnet40_train_8192pts_fps.dat", "modelnet40_shape_names.txt"],
        ["train800"],
    ),
}


def assert_names_its_layout_and_page(message: str, page: str, own: list[str], foreign: list[str]) -> None:
    assert f"see datasets/{page}" in message, message
    for name in own:
        assert name in message, (name, message)
    for name in foreign:
        assert name not in message, (name, message)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("root", ["missing", "empty"])
def test_missing_data_names_its_own_layout_and_page(name, root, tmp_path):
    module, kwargs, page, own, foreign = CASES[name]
    folder = tmp_path / "data"
    if root == "empty":
        folder.mkdir()
        if name == "vtab1k":
            (folder / "eurosat").mkdir()  # the task folder exists but holds no split files
    with pytest.raises(FileNotFoundError) as info:
        module(str(folder), **kwargs)
    assert_names_its_layout_and_page(str(info.value), page, own, foreign)
    assert (REPO / "datasets" / page).is_file()


def test_every_page_is_in_the_index_and_every_data_module_has_one():
    index = (REPO / "datasets" / "README.md").read_text()
    pages = sorted(p.name for p in (REPO / "datasets").glob("*.md") if p.name != "README.md")
    assert pages == sorted(case[2] for case in CASES.values())
    for page in pages:
        assert f"({page})" in index, page
        text = (REPO / "datasets" / page).read_text()
        assert "## Layout" in text and "Checksums:" in text, page


def test_the_fgvc_page_gives_the_split_script_and_the_vtab_page_the_dump(tmp_path):
    assert "python scripts/make_fgvc_splits.py --train" in (REPO / "datasets" / "fgvc.md").read_text()
    assert (REPO / "scripts" / "make_fgvc_splits.py").is_file()
    assert "get_vtab1k.py" in (REPO / "datasets" / "vtab1k.md").read_text()


@pytest.mark.parametrize("config", ["configs/clip/zeroshot.yaml", "configs/vtab/lora.yaml"])
def test_a_vtab_or_clip_config_without_data_shows_vtab_files_from_the_cli(config, tmp_path, capsys):
    """The data module is built before the model, so this costs no CLIP or ViT-B build."""
    assert main(["fit", "-c", str(REPO / config), "--data.init_args.root", str(tmp_path / "vtab-1k")]) == 2
    err = capsys.readouterr().err
    assert_names_its_layout_and_page(err, "vtab1k.md", ["train800val200.txt", "images/"], ["<root>/train.txt"])
    assert re.search(r"VTAB-1k \w+ \(\w+ protocol\) at .*vtab-1k/\w+: folder .* does not exist", err), err


def test_nabirds_class_file_error_points_at_the_fgvc_page(tmp_path):
    from mmpeft.data.metadata import class_names

    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"classes.txt is missing.*see datasets/fgvc.md"):
        class_names("fgvc", "nabirds", tmp_path)
