"""The backbone registry (issue 23 item 4): names register beside their backbone, prefixes the same way,
`mmpeft backbones [FILTER]` lists them, and every command is in `mmpeft --help`."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

from mmpeft import backbones
from mmpeft.backbones import registry
from mmpeft.cli import build_own_parser, main
from mmpeft.core.errors import UnknownName


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))
    monkeypatch.setattr(registry, "_PREFIXES", dict(registry._PREFIXES))


def test_each_name_is_registered_in_the_module_that_defines_its_backbone():
    expected = {
        "digits_vit": "mmpeft.backbones.digits",
        "shapes_point": "mmpeft.backbones.shapes",
        "point_mae": "mmpeft.backbones.point",
        "point_bert": "mmpeft.backbones.point",
        "tiny_sd_unet": "mmpeft.backbones.diffusion",
        "tiny_dit": "mmpeft.backbones.dit",
    }
    assert {name: registry._NAMES[name].factory.__module__ for name in expected} == expected
    prefixes = {p: e.factory.__module__ for p, e in registry._PREFIXES.items()}
    assert prefixes == {
        "open_clip": "mmpeft.backbones.clip",
        "diffusers_unet": "mmpeft.backbones.diffusion",
        "diffusers_dit": "mmpeft.backbones.dit",
    }


def test_describe_lists_family_and_weights_and_filters():
    rows = {row["name"]: row for row in backbones.describe_backbones()}
    assert rows["tiny_dit"]["family"] == "dit" and rows["tiny_dit"]["takes_weights"] is False
    assert rows["diffusers_unet:<path>"]["family"] == "unet" and rows["diffusers_unet:<path>"]["takes_weights"]
    assert rows["digits_vit"]["family"] == "token" and rows["digits_vit"]["description"]
    assert "<timm model name>" in rows
    assert [row["name"] for row in backbones.describe_backbones("UNET")] == ["tiny_sd_unet", "diffusers_unet:<path>"]
    assert backbones.describe_backbones("no such thing") == []


def test_a_new_backbone_and_prefix_register_with_a_decorator(scratch_registry):
    @registry.register_backbone("my_mlp", family="generic", takes_weights=False)
    def my_mlp(width: int = 4) -> nn.Module:
        """a two-layer MLP"""
        return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))

    @registry.register_backbone_prefix("mlp_file", usage="mlp_file:<path>")
    def mlp_file(path: str, **kwargs) -> nn.Module:
        if not path:
            raise UnknownName("mlp_file backbones are named 'mlp_file:<path>'")
        return nn.Linear(3, 3)

    assert backbones.create_backbone("my_mlp", width=8)[0].in_features == 8
    assert isinstance(backbones.create_backbone("mlp_file:/some/file"), nn.Linear)
    with pytest.raises(UnknownName, match="mlp_file:<path>"):
        backbones.create_backbone("mlp_file:")
    assert "my_mlp" in backbones.backbone_names() and "mlp_file:<path>" in backbones.backbone_names()
    assert {"name": "my_mlp", "family": "generic", "takes_weights": False, "description": "a two-layer MLP"} in (
        backbones.describe_backbones("mlp")
    )
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_backbone("my_mlp")(nn.Identity)


@pytest.mark.parametrize("name", ["diffusers_unet:", "diffusers_dit:", "open_clip:ViT-B-32", "open_clip:"])
def test_a_prefix_without_its_rest_is_refused_naming_the_form(name):
    with pytest.raises(UnknownName, match="backbones are named"):
        backbones.create_backbone(name)


def test_mmpeft_backbones_prints_the_table(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("digits_vit", "tiny_sd_unet", "open_clip:<model>:image|text", "diffusers_dit:<path>"):
        assert f"| {name} |" in out
    assert main(["backbones", "point"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "name" not in line]
    assert sorted(line.split("|")[1].strip() for line in lines) == [
        "any2point",
        "point_bert",
        "point_mae",
        "shapes_point",
    ]


def test_help_names_every_command():
    parser = build_own_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    usage = inspect.getmodule(main).__doc__
    assert set(commands) >= {"sweep", "export-lora", "import-lora", "backbones"}
    missing = [c for c in commands if f"mmpeft {c}" not in usage and c not in ("fit", "validate", "test", "predict")]
    assert not missing, f"`mmpeft --help` does not describe {missing}"
    assert "mmpeft fit|validate|test|predict" in usage
