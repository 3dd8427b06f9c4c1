"""A whole sweep checked before its first cell runs: structure, task names, and every cell's config parsed with
`mmpeft fit`'s own parser; every problem in one line."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.errors import MmpeftError
from mmpeft.lab.sweep.plan import cell_args, grid
from mmpeft.lab.sweep.spec import Sweep, SweepError

# -- checking a sweep before it runs ---------------------------------------------------------------------------

OVERRIDE_RULE_KEYS = ("task", "method", "search", "args")
METHOD_KEYS = ("model.init_args.method", "model.init_args.text_method")  # method specs `mmpeft fit` builds


def check_sweep(sweep: Sweep, where: str | Path = "sweep") -> None:
    """Every problem of a sweep in one `SweepError` (one line): its structure, unknown tasks, missing or
    unparsable method configs, unknown method names or options, and dotted keys the config does not have."""
    problems = _check_structure(sweep)  # wrong types: nothing else can be checked
    if not problems:
        for i, rule in enumerate(sweep.overrides):
            unknown = sorted(set(rule) - set(OVERRIDE_RULE_KEYS))
            if unknown:
                problems.append(f"overrides[{i}]: unknown keys {unknown}; known: {list(OVERRIDE_RULE_KEYS)}")
        problems += _check_tasks(sweep)
        problems += _check_methods(sweep)
    if problems:
        listed = "; ".join(f"({i}) {problem}" for i, problem in enumerate(problems, 1))
        raise SweepError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}, no cell ran: {listed}")


def _check_structure(sweep: Sweep) -> list[str]:
    """Values of the wrong type (tasks not a list, a search value not a list, ...)."""
    problems = []

    def mapping_of_lists(value: Any, where: str) -> None:
        if not isinstance(value, Mapping):
            problems.append(f"{where} must map dotted keys to lists of values, not {value!r}")
            return
        for key, values in value.items():
            if not isinstance(values, list) or not values:
                problems.append(f"{where}.{key} must be a non-empty list of values, not {values!r}")

    if not isinstance(sweep.tasks, list) or not sweep.tasks or not all(isinstance(t, str) for t in sweep.tasks):
        problems.append(f"tasks must be a non-empty list of task names, not {sweep.tasks!r}")
    if not isinstance(sweep.seeds, list) or not sweep.seeds or not all(isinstance(x, int) for x in sweep.seeds):
        problems.append(f"seeds must be a non-empty list of integers, not {sweep.seeds!r}")
    if not isinstance(sweep.seed_keys, list) or not all(isinstance(k, str) for k in sweep.seed_keys):
        problems.append(f"seed_keys must be a list of dotted keys (data.init_args.shot_seed), not {sweep.seed_keys!r}")
    for name in ("task_key", "protocol_key"):
        if getattr(sweep, name) is not None and not isinstance(getattr(sweep, name), str):
            problems.append(f"{name} must be a dotted key or null, not {getattr(sweep, name)!r}")
    if not isinstance(sweep.methods, Mapping) or not sweep.methods:
        problems.append(f"methods must map method labels to config files, not {sweep.methods!r}")
    else:
        for label, files in sweep.methods.items():
            listed = isinstance(files, list) and files and all(isinstance(f, str) for f in files)
            if not (isinstance(files, str) or listed):
                problems.append(f"method {label!r}: a config file or a list of them, not {files!r}")
    mapping_of_lists(sweep.search, "search")
    if not isinstance(sweep.args, Mapping):
        problems.append(f"args must map dotted keys to values, not {sweep.args!r}")
    if not isinstance(sweep.overrides, list):
        problems.append(f"overrides must be a list of {{task, method, search, args}} rules, not {sweep.overrides!r}")
        return problems
    for i, rule in enumerate(sweep.overrides):
        where = f"overrides[{i}]"
        if not isinstance(rule, Mapping):
            problems.append(f"{where} must be a mapping with keys {list(OVERRIDE_RULE_KEYS)}, not {rule!r}")
            continue
        if "search" in rule:
            mapping_of_lists(rule["search"], f"{where}.search")
        if not isinstance(rule.get("args", {}), Mapping):
            problems.append(f"{where}.args must map dotted keys to values, not {rule['args']!r}")
    return problems


def _check_tasks(sweep: Sweep) -> list[str]:
    """With `metadata` set, every task, and every task an override rule names (a rule for a task the sweep does
    not run is fine: one file can hold every task's settings), is one of that dataset metadata's tasks
    (`mmpeft.data.metadata.load_metadata`; FGVC's: its datasets)."""
    if not sweep.metadata:
        return []
    from mmpeft.data.metadata import load_metadata

    try:
        meta = load_metadata(sweep.metadata)
    except (FileNotFoundError, MmpeftError) as err:
        return [f"metadata {sweep.metadata!r}: {err} (set `metadata: null` for tasks without metadata)"]
    known = list(meta.get("tasks", meta.get("datasets", {})))
    named = [(task, "") for task in sweep.tasks]
    named += [(rule["task"], f" in overrides[{i}]") for i, rule in enumerate(sweep.overrides) if "task" in rule]
    problems = []
    for task, where in named:
        if task not in known:
            near = difflib.get_close_matches(str(task), known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(known)}"
            problems.append(f"unknown task {task!r}{where} (not in the {sweep.metadata!r} dataset metadata; {hint})")
    return problems


def _check_methods(sweep: Sweep) -> list[str]:
    """Each method's config files, parsed with `mmpeft fit`'s parser alone and with every distinct set of the
    sweep's overrides for it; unknown dotted keys are collected over the whole sweep, one problem per key."""
    problems: list[str] = []
    unknown: dict[str, dict[str, None]] = {}  # unknown key -> the methods it is unknown for (ordered)
    bad: dict[str, dict[str, str]] = {}  # a config's or a cell's problem -> {method: where it first shows}
    known_keys: set[str] = set()
    parser = None
    for label in sweep.methods:
        files = sweep.configs(label)
        unreadable = [b for b in map(_unreadable, files) if b]
        if unreadable:
            problems += [f"method {label!r}: {b}" for b in unreadable]
            continue
        parser = parser or _config_parser()
        base, err = _parse(parser, files, {})
        if base is None:
            problems.append(f"method {label!r} ({', '.join(files)}): {err}")
            continue
        known = {k for k in base.keys() if k != "config"}
        known_keys |= known
        for problem in _method_spec_problems(base):
            bad.setdefault(problem, {})[label] = ""  # "": the config itself
        seen: set[str] = set()
        for where, overrides in _override_sets(sweep, label):
            fingerprint = json.dumps(overrides, sort_keys=True, default=str)
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            parsed, err = _parse(parser, files, overrides)
            missing = [k for k in overrides if not _known_key(k, known)] if parsed is None else []
            for k in missing:
                unknown.setdefault(k, {})[label] = None
            if missing:  # the other keys may still hold a bad value
                parsed, err = _parse(parser, files, {k: v for k, v in overrides.items() if k not in missing})
            for problem in [err] if parsed is None else _method_spec_problems(parsed):
                bad.setdefault(problem, {}).setdefault(label, f", {where}")  # once per method, where it shows first
    for problem, wheres in bad.items():
        label, where = next(iter(wheres.items()))
        if len(wheres) == 1:
            name = f"method {label!r} ({', '.join(sweep.configs(label))})"
        else:
            name = "methods " + ", ".join(map(repr, wheres))
        problems.append(f"{name}{where}: {problem}")
    for key, labels in unknown.items():
        near = _near_key(key, known_keys)
        hint = f"; did you mean {near!r}?" if near else ""
        problems.append(f"unknown key {key!r} (method {', '.join(map(repr, labels))}){hint}")
    return problems


def _unreadable(path: str) -> str | None:
    """Why a config file cannot be used (missing, not YAML, not a mapping), or None."""
    if not Path(path).is_file():
        return f"config {path!r} does not exist"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        return f"config {path!r} is not valid YAML{where}: {getattr(err, 'problem', None) or one_line(err)}"
    if not isinstance(data, Mapping):
        return f"config {path!r} is not a mapping of options"
    return None


def _config_parser():
    """`mmpeft`'s own LightningCLI parser (`mmpeft.lab.lightning_cli.build_parser`); `_parse` uses its `fit`
    subcommand, whose options (`ckpt_path`, ...) are those of a cell's `mmpeft fit`. Parsing instantiates nothing."""
    from mmpeft.lab.lightning_cli import build_parser

    return build_parser()


def _parse(parser, files: list[str], overrides: Mapping[str, Any]) -> tuple[Any, str]:
    """(namespace, "") or (None, the parser's complaint on one line) for `mmpeft fit -c FILES... -c OVERRIDES`."""
    args = ["fit", *(a for f in files for a in ("-c", f))]
    if overrides:
        args += ["--config", yaml.safe_dump(nested(overrides))]  # jsonargparse reads a config given as a string
    try:
        return parser.parse_args(args)["fit"], ""
    except Exception as err:  # jsonargparse's ArgumentError, or whatever a bad file raises
        from mmpeft.lab.lightning_cli import condense_parse_error

        return None, condense_parse_error(str(err), hint=False)


def one_line(err: BaseException) -> str:
    """An error's message on one line (a YAML or method error; parse errors go through `condense_parse_error`)."""
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    return ": ".join(line.rstrip(":") for line in lines if line) or type(err).__name__


def _method_spec_problems(config: Any) -> list[str]:
    """An unknown method name, preset or option in a parsed config's method specs (`method_from_spec`)."""
    from mmpeft.core.method import method_from_spec

    problems = []
    for key in METHOD_KEYS:
        if key not in config:
            continue
        spec = config.get(key)
        if key != METHOD_KEYS[0] and spec is None:
            continue  # no text method
        try:
            method_from_spec(spec.as_dict() if hasattr(spec, "as_dict") else spec)
        except (MmpeftError, TypeError, ValueError) as err:
            problems.append(f"{key}: {one_line(err)}")
    return problems


def _override_sets(sweep: Sweep, method: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, dotted overrides) of every cell the sweep can run for `method`, task names set aside (`check_sweep`
    checks them against the metadata) so that tasks sharing settings are parsed once."""
    for task in sweep.tasks:
        search, fixed = sweep.settings(task, method)
        for point in grid(search):
            args = cell_args(sweep, 1, sweep.tasks[0], sweep.seeds[0], point, fixed)
            yield f"task {task!r}" + (f", point {point}" if point else ""), args


def _known_key(key: str, known: set[str]) -> bool:
    """A dotted key the parsed config has, or a group of them (`model.init_args.backbone`)."""
    return key in known or any(k.startswith(key + ".") for k in known)


def _near_key(key: str, known: Iterable[str]) -> str | None:
    """The known key the misspelt `key` most likely meant: a sibling with a close name, else a close full key."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    near = difflib.get_close_matches(leaf, list(siblings), n=1)
    if near:
        return siblings[near[0]]
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.85)
    return near[0] if near else None


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.init_args.lr": 0.1} -> {"model": {"init_args": {"lr": 0.1}}} (a config file LightningCLI merges)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
