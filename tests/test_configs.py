"""Every shipped config parses (types, class paths, method specs) without building anything."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from mmpeft.cli import run_cli
from mmpeft.core.method import method_from_spec

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


def _parse(*files: pathlib.Path, capsys) -> dict:
    args = ["fit"] + [a for f in files for a in ("-c", str(f))] + ["--print_config"]
    with pytest.raises(SystemExit) as done:
        run_cli(args)
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("override", sorted((CONFIGS / "digits").glob("*.yaml")), ids=lambda p: p.stem)
def test_digits_configs_compose_with_the_quickstart(override, capsys):
    config = _parse(QUICKSTART, override, capsys=capsys)
    method = config["model"]["init_args"]["method"]
    assert method_from_spec(method).name in override.stem or override.stem in ("linear_random", "scratch")


STANDALONE = [QUICKSTART, CONFIGS / "image_list.yaml", *sorted(CONFIGS.glob("vtab/*.yaml")),
              *sorted(CONFIGS.glob("fgvc/*.yaml")), *sorted(CONFIGS.glob("clip/*.yaml")),
              *sorted(CONFIGS.glob("point/*/*.yaml")), CONFIGS / "point" / "quickstart.yaml"]  # fmt: skip


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_standalone_configs_parse(path, capsys):
    config = _parse(path, capsys=capsys)
    method = method_from_spec(config["model"]["init_args"]["method"])
    if path.parent.name in ("vtab", "fgvc", "scanobjectnn", "modelnet40"):
        expected = {"vpt_shallow": "vpt", "vpt_deep": "vpt"}.get(path.stem, path.stem)
        assert method.name == expected
        assert config["run"]["test_after_fit"] and config["data"]["init_args"]["protocol"] == "final"


def test_every_method_has_vtab_and_fgvc_configs():
    from mmpeft.core.method import list_methods

    for bench in ("vtab", "fgvc"):
        names = {"vpt" if p.stem.startswith("vpt_") else p.stem for p in (CONFIGS / bench).glob("*.yaml")}
        assert set(list_methods()) <= names, bench
