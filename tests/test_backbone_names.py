"""Backbones by name on the command line, class-path typos and backbone discovery (issue 22 item 19)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpeft.backbones import DigitsViT, backbone_classes, digits
from mmpeft.cli import main, run_cli

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def short_fit(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "-c", QUICKSTART, *extra, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--run.dir",
            str(tmp_path / "runs"), "--run.wandb", "disabled"]  # fmt: skip


@pytest.fixture
def one_epoch_digits(monkeypatch, tmp_path):
    """The digits ViT's pretraining cut to one epoch, cached in tmp_path (the recipe keys the cache file)."""
    monkeypatch.setitem(digits.RECIPE, "epochs", 1)
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_registered_name_is_a_backbone_on_the_command_line(one_epoch_digits, tmp_path):
    """`--model.init_args.backbone digits_vit` builds what create_backbone("digits_vit") builds: the pretrained
    digits ViT, pretrained here inside the task's construction (the CLI's hyper-parameter context must not leak
    into the pretraining's data module)."""
    assert main(short_fit(tmp_path, "--model.init_args.backbone", "digits_vit")) == 0
    (cached,) = one_epoch_digits.glob("digits_vit-*.safetensors")
    assert list((tmp_path / "runs" / "quickstart").glob("version_0/summary.json"))
    cli = run_cli(short_fit(tmp_path, "--model.init_args.backbone", "digits_vit")[1:], run=False)  # no subcommand
    backbone = cli.model.model.backbone
    assert type(backbone) is DigitsViT
    weights = load_file(cached)
    assert all(torch.equal(weights[k], v) for k, v in backbone.state_dict().items() if k in weights)
    assert set(weights) <= set(backbone.state_dict())


def test_an_unknown_name_lists_the_registered_ones(tmp_path, capsys):
    assert main(short_fit(tmp_path, "--model.init_args.backbone", "digit_vit")) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'digit_vit' (did you mean digits_vit, digits_dit?)" in err
    for name in ("digits_vit", "shapes_point", "tiny_dit", "point_mae", "diffusers_unet:<path>", "open_clip:<model>"):
        assert name in err, name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.backbone.class_path", "mmpeft.backbones.TimmVit"],
         "model.backbone: no class 'mmpeft.backbones.TimmVit' (module 'mmpeft.backbones' has no attribute "
         "'TimmVit'); did you mean mmpeft.backbones.TimmViT"),
        (["--model.init_args.backbone.class_path", "mmpeft.backbone.DigitsViT"],
         "did you mean mmpeft.backbones.DigitsViT"),
        (["--model.class_path", "mmpeft.tasks.ImageClasification"], "did you mean mmpeft.tasks.ImageClassification"),
        (["--model.init_args.backbone", "DigitsVit"],
         "no backbone class 'DigitsVit'; did you mean mmpeft.backbones.DigitsViT, mmpeft.backbones.DigitsDiT?"),
    ],
)  # fmt: skip
def test_class_path_typos_get_a_suggestion(args, expected, tmp_path, capsys):
    assert main(short_fit(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_fit_help_lists_mmpeft_backbones(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help is wrapped
    epilog = out[out.index("backbones for --model.backbone") :]
    for path in backbone_classes():
        assert path in epilog, path
    assert "digits_vit" in epilog and "a timm model name" in epilog
