"""Method options on the command line: one line of help per field, `mmpeft methods [NAME]`, `fit --help`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

import mmpeft.methods  # noqa: F401  (registers the built-in methods)
from mmpeft.cli import main
from mmpeft.core.method import METHODS, get_method, list_methods
from mmpeft.methods import LoRA
from mmpeft.methods.info import method_summary, spelling


@pytest.mark.parametrize("name", list_methods())
def test_every_field_of_every_method_has_one_line_of_help(name):
    cls = get_method(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    options = cls.options()
    shared = ["param_dtype", "head_init"]
    assert [o["name"] for o in options] == [*(f for f in fields if f not in shared), *shared]
    for option in options:
        assert option["help"].strip(), f"{name}.{option['name']} has no help: give the field metadata={{'help': ...}}"
        assert "\n" not in option["help"], f"{name}.{option['name']}: help is one line"
        assert option["type"] and option["default"] is not dataclasses.MISSING
    assert not any("help" in vars(klass) for klass in cls.__mro__), "help lives on the fields, not in a dict"


def test_options_read_help_from_the_fields_along_the_class_hierarchy():
    @dataclass
    class WideLoRA(LoRA):  # not registered: the mechanism, not the registry
        width: int = field(default=2, metadata={"help": "how wide"})

    options = {o["name"]: o for o in WideLoRA.options()}
    assert list(options) == ["r", "alpha", "dropout", "targets", "b_lr_ratio", "init", "width", "param_dtype",
                             "head_init"]  # fmt: skip
    assert options["width"] == {"name": "width", "type": "int", "default": 2, "help": "how wide"}
    assert options["targets"]["type"] == "tuple[str, ...] | None"
    assert (
        options["targets"]["help"] == next(f for f in dataclasses.fields(LoRA) if f.name == "targets").metadata["help"]
    )
    assert options["targets"]["help"].startswith("module-name patterns")
    assert options["param_dtype"]["default"] == "float32" and "dtype" in options["param_dtype"]["help"]


def test_mmpeft_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["method", "mergeable"]
    for name in list_methods():
        cls = METHODS[name]
        row = next(line for line in lines if line.split()[:1] == [name])
        cells = row.split()
        assert cells[1:3] == ["yes" if cls.mergeable else "no", "yes" if cls.needs_tokens else "no"]
        assert row.endswith(method_summary(cls))
    assert method_summary(LoRA).startswith("LoRA: ") and method_summary(LoRA).endswith("B zero.")


def test_mmpeft_methods_lora_prints_options_and_presets(capsys):
    assert main(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"lora: {method_summary(LoRA)}"
    assert "mergeable: yes; token backbones only: no" in out
    for option in LoRA.options():
        row = next(line for line in lines if line.split()[:1] == [option["name"]])
        assert option["type"] in row and f"  {spelling(option['default'])}  " in row and row.endswith(option["help"])
    header = next(line.split() for line in lines if line.split()[:1] == ["preset"])
    assert header == ["preset", "r", "alpha", "dropout", "targets", "b_lr_ratio", "init", "param_dtype", "head_init"]
    presets = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["default"], ["paper"])}
    assert presets["default"] == ["8", "null", "0.0", "null", "1.0", "kaiming", "float32", "null"]
    assert presets["paper"] == ["8", "null", "0.1", "[attn.qkv]", "1.0", "kaiming", "float32", '"trunc_normal:0.02"']


def test_value_spelling_is_yaml():
    assert [spelling(v) for v in (None, True, 0.1, "gelu", ("attn", "mlp"), "yes", "a b")] == [
        "null", "true", "0.1", "gelu", "[attn, mlp]", '"yes"', '"a b"'
    ]  # fmt: skip


def test_an_unknown_method_name_is_one_line_with_close_matches(capsys):
    assert main(["methods", "lroa"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpeft: error: unknown method 'lroa'") and "did you mean lora" in err
    assert len(err.splitlines()) == 1


def test_lightning_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help formatter wraps the epilog
    assert "mmpeft methods NAME" in out
    assert f"presets): {', '.join(list_methods())}" in out
