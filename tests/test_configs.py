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


@pytest.mark.parametrize("path", [QUICKSTART, CONFIGS / "image_list.yaml"], ids=lambda p: p.stem)
def test_standalone_configs_parse(path, capsys):
    config = _parse(path, capsys=capsys)
    method_from_spec(config["model"]["init_args"]["method"])
