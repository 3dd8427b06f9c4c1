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
        stem = "any2point" if path.stem.startswith("any2point_") else path.stem  # one config per kind of source
        expected = {"vpt_shallow": "vpt", "vpt_deep": "vpt"}.get(stem, stem)
        assert method.name == expected
        assert config["run"]["test_after_fit"] and config["data"]["init_args"]["protocol"] == "final"


def test_every_method_has_vtab_and_fgvc_configs():
    """Image methods on VTAB-1k and FGVC; methods that read point geometry on ScanObjectNN and ModelNet40; methods
    that quantize a denoiser in configs/diffusion/."""
    from mmpeft.core.method import get_method, list_methods

    points = {m for m in list_methods() if get_method(m).needs_points}
    denoisers = {m for m in list_methods() if get_method(m).needs_denoiser}  # diffusion-only: their own configs
    for bench in ("vtab", "fgvc"):
        names = {"vpt" if p.stem.startswith("vpt_") else p.stem for p in (CONFIGS / bench).glob("*.yaml")}
        assert set(list_methods()) - points - denoisers <= names, bench
    assert denoisers and all(list((CONFIGS / "diffusion").glob(f"{m}_*.yaml")) for m in denoisers)
    for bench in ("point/scanobjectnn", "point/modelnet40"):
        stems = {p.stem for p in (CONFIGS / bench).glob("*.yaml")}
        assert points and points - {"any2point"} <= stems, bench
        assert {"any2point_dinov2", "any2point_clip_text"} <= stems, bench  # one per kind of source


# -- class paths keep resolving after the modules moved (issue 23) ----------------------------------------------
RUN_CONFIGS = sorted((pathlib.Path(__file__).parent / "fixtures" / "run_configs_0.1").glob("*.yaml"))
EVERY_CONFIG = [*STANDALONE, *sorted(CONFIGS.glob("diffusion/*.yaml")), *sorted(CONFIGS.glob("toy/*.yaml"))]


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _class_paths(value)]
    return []


@pytest.mark.parametrize("path", [*EVERY_CONFIG, *RUN_CONFIGS], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_and_a_run_config_saved_before_the_move_parse_with_the_public_parser(path, recwarn):
    """`build_parser` is the parser sweeps check cells with: every shipped config and the `config.yaml` of runs
    made with mmpeft 0.1 before the modules moved parse, and every class path they name imports without a
    deprecation warning (they name package-level classes, which stay)."""
    import importlib

    from mmpeft.lab.lightning_cli import build_parser

    parsed = build_parser().parse_args(["fit", "-c", str(path)])["fit"]
    paths = _class_paths(yaml.safe_load(path.read_text()))
    assert parsed["model"]["class_path"].startswith("mmpeft.") and paths
    for class_path in paths:
        module, _, name = class_path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), class_path
    moved = [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "moved" in str(w.message)]
    assert not moved, [str(w.message) for w in moved]
