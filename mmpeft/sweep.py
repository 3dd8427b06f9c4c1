"""`mmpeft sweep SWEEP.yaml`: tasks x methods x seeds x a search grid, with the two-stage protocol.

Stage 1 trains every search point on the tuning split (VTAB: train800) with the first seed and
selects the point with the best value of the sweep's `select` metric on validation (val200). Stage 2
retrains the chosen point on train+val for every seed and evaluates the test split once. The test
split never selects anything.

Any scalar metric a run logs can select and be reported (cells read it from their run's `summary.json`:
`metrics[name]`, or the legacy `val_acc` / `test_acc` keys of older summaries):

    select: {metric: val/acc, mode: max}   # the default; a diffusion sweep: {metric: val/fid, mode: min}
    report: test/acc                       # the default: the select metric with `val/` replaced by `test/`

A finished cell whose summary lacks the metric its stage needs stops the sweep at once with a one-line
error naming the metric, the cell and the metrics it has (a misspelt name should not cost a whole stage).

The whole sweep is checked before the first cell runs (`check_sweep`): every task is in the dataset
metadata (when `metadata` is set), every method config exists and parses with `mmpeft fit`'s own parser
(unknown options, unknown method names and method options included), and every dotted key in `args`,
`search` and `overrides` exists in it. All problems come in one `SweepError`, and nothing runs.

Each cell is one `mmpeft fit` in its own process (crash isolation, a fresh CUDA context), with its
log, run directory and adapter file kept. With `--parallel N` the cells are spread over the visible GPUs
(`device_slots`: one `CUDA_VISIBLE_DEVICES` id per cell, cycling over them; nothing is set without a GPU).
A cell is done when its result file exists, so a killed sweep resumes where it stopped. A cell's id
hashes what defines it: the content (not the path) of its method's config files and of any config file
they or its overrides refer to, its overrides, seed and stage. Editing the sweep file or a method config
reruns exactly the cells it changes; comments, formatting and moving a file rerun nothing (`select` and
`report` are not arguments: changing them reuses every cell). A method is one config file or a list of
them (merged in order, as `mmpeft fit -c A -c B`). Selection ties go to the earliest point in grid
order, whatever order cells finished or were resumed in.

Results: `cells.csv` (every cell, with the select and report metrics as columns named by metric) and
`results.md` (the report metric per task, mean ± std over seeds, parameters; for accuracies also group
means and both VTAB means, see `mmpeft.results`). Modality-agnostic: the task and data-root keys are
configurable, and groups come from the dataset metadata when known.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.errors import MmpeftError
from mmpeft.results import MetricMissing, is_accuracy, metric_label, metric_value, metrics_of, results_table

__all__ = [
    "Cell",
    "Sweep",
    "SweepError",
    "SweepInterrupted",
    "load_sweep",
    "check_sweep",
    "config_fingerprint",
    "device_slots",
    "plan_stage1",
    "plan_stage2",
    "select",
    "run_sweep",
    "add_sweep_arguments",
]

SELECT_DEFAULT = {"metric": "val/acc", "mode": "max"}
MODES = ("max", "min")


class SweepError(MmpeftError, ValueError):
    """A sweep file is malformed (unknown key, bad `select` mode, ...); the message names the key."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the message says what is done and how to resume (`mmpeft` prints it, exits 130)."""


@dataclass
class Cell:
    stage: int
    task: str
    method: str
    seed: int
    point: dict[str, Any]
    args: dict[str, Any]  # every dotted override this cell passes, point included
    configs: list[str]  # the method's config files, `-c` in this order
    fingerprint: str  # their content and that of config files they or `args` refer to, not their paths

    @property
    def id(self) -> str:
        """Stage, task, method label and seed for people; a hash of everything that defines the cell for reuse."""
        defined = [self.stage, self.seed, self.fingerprint, self.args]
        digest = hashlib.sha1(json.dumps(defined, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"s{self.stage}-{self.task}-{self.method}-seed{self.seed}-{digest}"


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def config_fingerprint(paths: Sequence[str | Path]) -> str:
    """A hash of the parsed content of config files, in order, and of every config file they refer to.

    Content, not paths: moving a file, or editing its comments or layout, keeps the fingerprint; any value
    changed in it or in a config it refers to (a string value naming an existing .yaml / .yml / .json
    file, relative to the referring file's folder or the working directory, as `mmpeft fit` reads it)
    changes it. A file that cannot be read or parsed hashes as the error, so plans never crash on it."""
    seen: set[Path] = set()

    def content(path: Path) -> Any:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            return {"unreadable": type(err).__name__}
        return {"content": data, "refers": [content(ref) for ref in _referred_files(data, path.parent, seen)]}

    tree = [content(Path(p)) for p in paths]
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _referred_files(data: Any, folder: Path, seen: set[Path]) -> list[Path]:
    """The config files a parsed config names as string values (each once, cycles cut)."""
    found: list[Path] = []
    stack = [data]
    while stack:
        node = stack.pop(0)
        if isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node.endswith(CONFIG_SUFFIXES):
            for candidate in (folder / node, Path(node)):
                if candidate.is_file():
                    resolved = candidate.resolve()
                    if resolved not in seen:
                        seen.add(resolved)
                        found.append(candidate)
                    break
    return found


@dataclass
class Sweep:
    name: str
    methods: dict[str, str | list[str]]  # method label -> config file, or files merged in order (`-c A -c B`)
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    search: dict[str, list] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    data_root: str | None = None
    task_key: str = "data.init_args.task"
    root_key: str = "data.init_args.root"
    protocol_key: str = "data.init_args.protocol"
    protocols: tuple[str, str] = ("tune", "final")
    metadata: str | None = "vtab1k"  # dataset metadata with task groups (None: no groups)
    out: str = "runs/sweeps"
    parallel: int = 1
    wandb: str = "auto"
    select: dict[str, str] = field(default_factory=lambda: dict(SELECT_DEFAULT))  # stage 1: metric and mode
    report: str | None = None  # stage 2's metric in results.md; None: `select.metric` with val/ -> test/

    def __post_init__(self) -> None:
        self.select = _selection(self.select)
        if self.report is None:
            self.report = _default_report(self.select["metric"])
        if not isinstance(self.report, str) or not self.report:
            raise SweepError(f"report must be a metric name such as 'test/acc', not {self.report!r}")

    def configs(self, method: str) -> list[str]:
        files = self.methods[method]
        return [files] if isinstance(files, str) else list(files)

    def settings(self, task: str, method: str) -> tuple[dict[str, list], dict[str, Any]]:
        """(search grid, fixed args) for one (task, method): global, then matching overrides in order."""
        search, args = dict(self.search), dict(self.args)
        for rule in self.overrides:
            if rule.get("task", task) == task and rule.get("method", method) == method:
                search = dict(rule["search"]) if "search" in rule else search
                args.update(rule.get("args", {}))
        return search, args


def _selection(select: Any) -> dict[str, str]:
    """`select:` with its defaults filled in; a bad key or mode is an error naming it and what is allowed."""
    if not isinstance(select, Mapping):
        raise SweepError(f"select must be a mapping such as {{metric: val/acc, mode: max}}, not {select!r}")
    unknown = set(select) - set(SELECT_DEFAULT)
    if unknown:
        raise SweepError(f"select: unknown keys {sorted(unknown)}; known: {sorted(SELECT_DEFAULT)}")
    out = {**SELECT_DEFAULT, **select}
    if not isinstance(out["metric"], str) or not out["metric"]:
        raise SweepError(f"select.metric must be a metric name such as 'val/acc', not {out['metric']!r}")
    if out["mode"] not in MODES:
        raise SweepError(f"select.mode must be one of {', '.join(map(repr, MODES))}, not {out['mode']!r}")
    return out


def _default_report(metric: str) -> str:
    """val/x -> test/x: stage 2 trains on train+val, so only a test metric means anything there."""
    if not metric.startswith("val/"):
        raise SweepError(f"select.metric {metric!r} does not start with 'val/', so set `report:` (e.g. test/...)")
    return "test/" + metric.removeprefix("val/")


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file's keys and `select` / `report`; `check_sweep` checks what they name (tasks, configs, keys)."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, Mapping):
        raise SweepError(f"{path}: a sweep file is a mapping (name, methods, tasks, ...), not {type(raw).__name__}")
    unknown = set(raw) - set(Sweep.__dataclass_fields__)
    if unknown:
        raise SweepError(f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(Sweep.__dataclass_fields__)}")
    try:
        sweep = Sweep(**raw)
    except SweepError as err:
        raise SweepError(f"{path}: {err}") from None
    return sweep


def _grid(search: Mapping[str, list]) -> list[dict[str, Any]]:
    keys = list(search)
    return [dict(zip(keys, values)) for values in itertools.product(*(search[k] for k in keys))] or [{}]


def _cell_args(sweep: Sweep, stage: int, task: str, seed: int, point: dict, fixed: dict) -> dict[str, Any]:
    args = {**fixed, **point, sweep.task_key: task, sweep.protocol_key: sweep.protocols[stage - 1]}
    args["seed_everything"] = seed
    if sweep.data_root is not None:
        args[sweep.root_key] = sweep.data_root
    return args


def _fingerprints(sweep: Sweep) -> dict[str, str]:
    """Each method's config fingerprint, read once per plan (a config edited between stages is seen)."""
    return {method: config_fingerprint(sweep.configs(method)) for method in sweep.methods}


def _cell(sweep: Sweep, prints: dict, stage: int, task: str, method: str, seed: int, point: dict, fixed: dict) -> Cell:
    args = _cell_args(sweep, stage, task, seed, point, fixed)
    fingerprint = prints[method]
    referred = _referred_files(args, Path.cwd(), set())  # an override naming a config file: its content counts
    if referred:
        fingerprint += "+" + config_fingerprint(referred)
    return Cell(stage, task, method, seed, point, args, sweep.configs(method), fingerprint)


def plan_stage1(sweep: Sweep) -> list[Cell]:
    """Every search point on the tuning split, first seed; (task, method) pairs with one point skip it."""
    cells, prints = [], _fingerprints(sweep)
    for task, method in itertools.product(sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        points = _grid(search)
        if len(points) > 1:
            cells += [_cell(sweep, prints, 1, task, method, sweep.seeds[0], p, fixed) for p in points]
    return cells


def _score(result: Mapping[str, Any], metric: str, mode: str) -> float:
    """Higher is better in both modes; NaN (a diverged run) ranks below every number."""
    value = metric_value(result, metric)
    if math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def select(
    results: list[dict[str, Any]], metric: str = "val/acc", mode: str = "max"
) -> dict[tuple[str, str], dict[str, Any]]:
    """Best point per (task, method): highest `metric` (mode max) or lowest (min); ties keep the earlier result.

    `plan_stage2` passes the results in grid order, so there a tie goes to the earlier grid point."""
    best: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for r in results:
        key, score = (r["task"], r["method"]), _score(r, metric, mode)
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    return {key: r for key, (_, r) in best.items()}


def _in_grid_order(sweep: Sweep, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage-1 results sorted by their point's place in the current grid of their (task, method).

    The sort is what makes a tie go to the first grid point whatever order the results arrive in (finishing
    order, resumed cells, a grid reordered since an earlier run); a point no longer in the grid sorts last."""
    grids: dict[tuple[str, str], list[dict]] = {}

    def rank(r: dict[str, Any]) -> int:
        key = (r["task"], r["method"])
        if key not in grids:
            grids[key] = _grid(sweep.settings(*key)[0]) if r["method"] in sweep.methods else []
        points = grids[key]
        return points.index(r["point"]) if r["point"] in points else len(points)

    return sorted(results, key=rank)


def plan_stage2(sweep: Sweep, stage1: list[dict[str, Any]]) -> list[Cell]:
    chosen = select(_in_grid_order(sweep, stage1), sweep.select["metric"], sweep.select["mode"])
    cells, prints = [], _fingerprints(sweep)
    for task, method in itertools.product(sweep.tasks, sweep.methods):
        search, fixed = sweep.settings(task, method)
        point = chosen[(task, method)]["point"] if (task, method) in chosen else _grid(search)[0]
        cells += [_cell(sweep, prints, 2, task, method, seed, point, fixed) for seed in sweep.seeds]
    return cells


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
    from mmpeft.data.metadata import load_metadata  # noqa: PLC0415

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
        return f"config {path!r} is not valid YAML{where}: {getattr(err, 'problem', None) or _one_line(err)}"
    if not isinstance(data, Mapping):
        return f"config {path!r} is not a mapping of options"
    return None


@functools.cache
def _config_parser():
    """`mmpeft`'s own LightningCLI parser (with its `run.*` options), built once and never run; `_parse` uses
    its `fit` subcommand, whose options (`ckpt_path`, ...) are those of a cell's `mmpeft fit`.

    Parsing checks every key and value against the classes' signatures without instantiating anything
    (no backbone is built, no weights or data are read)."""
    from mmpeft.cli import _make_cli_class  # noqa: PLC0415

    class ParseOnly(_make_cli_class()):
        def __init__(self) -> None:
            super().__init__(args=[], run=True)

        def init_parser(self, **kwargs: Any):
            return super().init_parser(**{**kwargs, "exit_on_error": False})  # errors raise instead of exiting

        def parse_arguments(self, parser, args) -> None:
            self.config = {"subcommand": None}  # nothing parsed, so nothing runs

        def _parse_ckpt_path(self) -> None:
            pass

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    return ParseOnly().parser


def _parse(parser, files: list[str], overrides: Mapping[str, Any]) -> tuple[Any, str]:
    """(namespace, "") or (None, the parser's complaint on one line) for `mmpeft fit -c FILES... -c OVERRIDES`."""
    args = ["fit", *(a for f in files for a in ("-c", f))]
    if overrides:
        args += ["--config", yaml.safe_dump(_nested(overrides))]  # jsonargparse reads a config given as a string
    try:
        return parser.parse_args(args)["fit"], ""
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError, or whatever a bad file raises
        return None, _one_line(err)


NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
         "Expected a <class 'NoneType'>")  # fmt: skip


def _one_line(err: BaseException) -> str:
    """jsonargparse's indented, multi-line explanation as one line: the path to the problem, then the problem."""
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    return ": ".join(line.rstrip(":") for line in lines if line and not line.startswith(NOISE)) or type(err).__name__


def _method_spec_problems(config: Any) -> list[str]:
    """An unknown method name, preset or option in a parsed config's method specs (`method_from_spec`)."""
    from mmpeft.core.method import method_from_spec  # noqa: PLC0415

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
            problems.append(f"{key}: {_one_line(err)}")
    return problems


def _override_sets(sweep: Sweep, method: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, dotted overrides) of every cell the sweep can run for `method`, task names set aside (`check_sweep`
    checks them against the metadata) so that tasks sharing settings are parsed once."""
    for task in sweep.tasks:
        search, fixed = sweep.settings(task, method)
        for point in _grid(search):
            args = _cell_args(sweep, 1, sweep.tasks[0], sweep.seeds[0], point, fixed)
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


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.init_args.lr": 0.1} -> {"model": {"init_args": {"lr": 0.1}}} (a config file LightningCLI merges)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def device_slots(parallel: int, gpus: int, visible: str | None = None) -> list[str | None]:
    """The `CUDA_VISIBLE_DEVICES` of each of the `parallel` cell slots: the GPUs in turn, cycling when there are
    more slots than GPUs; None (nothing set) without a GPU.

    gpus: `torch.cuda.device_count()`; visible: the sweep's own `CUDA_VISIBLE_DEVICES`, whose ids (numbers or
    UUIDs) are the ones handed out, since a child's ids are read through it. `device_slots(4, 2)` is
    ["0", "1", "0", "1"]; `device_slots(2, 2, "2,5")` is ["2", "5"]; `device_slots(3, 0)` is [None] * 3."""
    parallel = max(parallel, 1)
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else []
    ids = ids[:gpus] if ids else [str(i) for i in range(gpus)]  # CUDA stops at the first id it cannot use
    if gpus <= 0 or not ids:
        return [None] * parallel
    return [ids[k % len(ids)] for k in range(parallel)]


def cpu_threads_per_cell(parallel: int, cpus: int, omp_env: str | None) -> str | None:
    """The `OMP_NUM_THREADS` of a cell that runs on the CPU: the machine's cores shared among the `parallel`
    cells (at least one each), unless the user set `OMP_NUM_THREADS` (None: keep theirs). Without it every cell
    starts one thread per core and `parallel` cells oversubscribe the cores: two cached-probe cells at once on two
    cores ran 10x slower than one alone (142 s against 13 s), their threads spinning against each other."""
    if omp_env or parallel <= 1:
        return None
    return str(max(1, cpus // parallel))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpu_count() -> int:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: run on the CPU
        return 0


class Runner:
    """Runs cells in subprocesses, `parallel` at a time, each slot on its own GPU (`device_slots`)."""

    def __init__(self, sweep: Sweep, out: Path, log=print):
        self.sweep, self.out, self.log = sweep, out, log
        self.devices = device_slots(sweep.parallel, _gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        for sub in ("cells", "logs", "runs", "configs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False  # set by Ctrl-C: no cell starts, the running ones are stopped, none counts as failed
        self.failed: list[str] = []
        self.missing: MetricMissing | None = None  # the first cell without its stage's metric stops the sweep

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.id}.json"

    def load(self, cell: Cell) -> dict[str, Any] | None:
        path = self.result_path(cell)
        return _result(cell, json.loads(path.read_text())) if path.is_file() else None

    def command(self, cell: Cell) -> list[str]:
        """`mmpeft fit -c <method config> -c <cell config>`; the cell config is kept for reproduction."""
        overrides = _nested(cell.args)
        overrides["run"] = {
            "dir": str(self.out / "runs"), "name": cell.id, "group": self.sweep.name, "wandb": self.sweep.wandb,
            "tags": [cell.method, cell.task, f"stage{cell.stage}"], "test_after_fit": cell.stage == 2,
        }  # fmt: skip
        overrides.setdefault("trainer", {})["enable_progress_bar"] = False
        path = self.out / "configs" / f"{cell.id}.yaml"
        path.write_text(yaml.safe_dump(overrides, sort_keys=False))
        configs = [a for config in cell.configs for a in ("-c", config)]
        return [sys.executable, "-m", "mmpeft.cli", "fit", *configs, "-c", str(path)]

    def run_one(self, cell: Cell, device: str | None) -> dict[str, Any] | None:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        else:
            threads = cpu_threads_per_cell(self.sweep.parallel, _cpu_count(), os.environ.get("OMP_NUM_THREADS"))
            if threads is not None:
                env["OMP_NUM_THREADS"] = threads
        start = time.perf_counter()
        with open(self.out / "logs" / f"{cell.id}.log", "w") as log:
            if self.stopping:
                return None
            process = subprocess.Popen(self.command(cell), stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.running.add(process)
                stopped = self.stopping  # Ctrl-C came while it started: `_stop_running` did not see it
            if stopped:
                process.terminate()
            try:
                returncode = process.wait()
            finally:
                with self.lock:
                    self.running.discard(process)
        if returncode != 0:
            with self.lock:
                if not self.stopping:  # a cell stopped by Ctrl-C has not failed: the rerun runs it again
                    self.failed.append(cell.id)
            return None
        versions = sorted((self.out / "runs" / cell.id).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        summary = json.loads((versions[-1] / "summary.json").read_text())
        result = _result(cell, {**summary, "seconds": round(time.perf_counter() - start, 1)})
        tmp = self.result_path(cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.result_path(cell))  # atomic: a killed sweep never leaves a half-written result
        return result

    def run(self, cells: list[Cell], stage: int, metric: str | None = None) -> list[dict[str, Any]]:
        """Run the cells without a result file, `parallel` at a time; returns every cell's result in cell order.

        Cell order (not finishing order) keeps selection ties deterministic. `metric` is the one this stage
        needs: the first result without it raises `MetricMissing` and no further cell starts."""
        loaded = [(c, self.load(c)) for c in cells]
        results = [r for _, r in loaded if r is not None]
        todo = [c for c, r in loaded if r is None]
        if metric is not None:
            for r in results:
                metric_value(r, metric)
        if results:
            self.log(f"stage {stage}: {len(results)} of {len(cells)} cells already done, skipped")
        if not todo:
            return results
        devices: queue.Queue = queue.Queue()
        for device in self.devices:
            devices.put(device)
        durations: list[float] = []
        start = time.perf_counter()

        def work(cell: Cell) -> None:
            if self.missing is not None or self.stopping:
                return  # the sweep is stopping: its metric is missing, or Ctrl-C
            device = devices.get()
            t0 = time.perf_counter()
            try:
                result = self.run_one(cell, device)
            except Exception as err:  # noqa: BLE001 - a broken cell must not stop the others
                self.log(f"cell {cell.id} failed in the runner: {err!r}")
                with self.lock:
                    self.failed.append(cell.id)
                result = None
            finally:
                devices.put(device)
            with self.lock:
                if self.stopping:
                    return
                durations.append(time.perf_counter() - t0)
                if result is not None:
                    results.append(result)
                    self._check(result, metric)
                self._progress(stage, cell, result, len(durations), len(todo), durations)

        with ThreadPoolExecutor(max_workers=max(self.sweep.parallel, 1)) as pool:
            try:
                list(pool.map(work, todo))
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                self._stop_running()
        if self.stopping:  # the pool has waited for the running cells to end
            done = sum(self.result_path(c).is_file() for c in cells)  # a cell may have ended as Ctrl-C came
            raise SweepInterrupted(f"stage {stage}: {done} of {len(cells)} cells done")
        if self.missing is not None:
            raise self.missing
        self.log(f"stage {stage}: {len(todo)} cells in {(time.perf_counter() - start) / 60:.1f} min")
        order = {c.id: i for i, c in enumerate(cells)}
        return sorted(results, key=lambda r: order[r["id"]])

    def _stop_running(self, grace: float = 10.0) -> None:
        """Ctrl-C: start no cell, and end the running ones (a terminal's Ctrl-C reached them too; a signal sent to
        the sweep alone did not), each left without a result file, so the rerun runs it again."""
        with self.lock:
            self.stopping = True
            running = list(self.running)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                process.terminate()

    def _check(self, result: dict[str, Any], metric: str | None) -> None:
        """Remember the first result without `metric` (the caller holds the lock)."""
        if metric is None or self.missing is not None:
            return
        try:
            metric_value(result, metric)
        except MetricMissing as err:
            self.missing = err

    def _progress(self, stage: int, cell: Cell, result: dict | None, done: int, total: int, durations: list) -> None:
        left = total - done
        running = min(max(self.sweep.parallel, 1), left)
        eta = sum(durations) / len(durations) * left / max(self.sweep.parallel, 1)
        if result is None:
            outcome = f"FAILED, see {self.out / 'logs' / cell.id}.log"
        else:
            found = metrics_of(result)
            metrics = dict.fromkeys((self.sweep.select["metric"], self.sweep.report))
            outcome = "ok " + " ".join(f"{k} {found[k]:.4f}" for k in metrics if k in found)
        self.log(
            f"[stage {stage}: {done}/{total} done, {running} running, {left} left, ETA {eta / 60:.1f} min] "
            f"{cell.task}/{cell.method} {cell.point or ''} {outcome}"
        )


def _result(cell: Cell, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's result: its run's summary under the cell's own fields.

    The summary's `method` is the PEFT method's name (vpt), not the sweep's label (vpt_deep), so the
    cell's label must win or selection and results.md would merge methods that share a name."""
    return {**summary, **asdict(cell), "id": cell.id}


def write_results(sweep: Sweep, out: Path, stage1: list[dict], stage2: list[dict]) -> str:
    rows = stage1 + stage2
    metrics = list(dict.fromkeys((sweep.select["metric"], sweep.report)))  # columns named by metric
    columns = ["id", "stage", "task", "method", "seed", "point", *metrics, "trainable", "adapter", "seconds"]
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["stage"], r["task"], r["method"], r["seed"])):
            found = metrics_of(r)
            writer.writerow({**r, "point": json.dumps(r["point"]), **{m: found.get(m) for m in metrics}})
    groups = {}
    if sweep.metadata:
        from mmpeft.data.metadata import load_metadata  # noqa: PLC0415

        meta = load_metadata(sweep.metadata)
        groups = {t: v.get("group", "all") for t, v in meta.get("tasks", {}).items()}
    table = results_table(stage2, groups, sweep.report)
    means = (
        "mean(G) = mean of the group means, mean(T) = mean of the tasks"
        if is_accuracy(sweep.report)
        else "mean = mean of the tasks"
    )
    chosen = f"{'highest' if sweep.select['mode'] == 'max' else 'lowest'} {sweep.select['metric']}"
    header = (
        f"# sweep {sweep.name}\n\n{metric_label(sweep.report)} of the point with the {chosen} in stage 1, "
        f"mean ± std over {len(sweep.seeds)} seed(s); {means}; parameters include the head.\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    return header + table


def run_sweep(path: str | Path, parallel: int | None = None, log=print) -> str:
    sweep = load_sweep(path)
    if parallel:
        sweep.parallel = parallel
    check_sweep(sweep, path)  # every problem at once, before anything is written or run
    out = Path(sweep.out) / sweep.name
    runner = Runner(sweep, out, log)
    if any(runner.devices):
        log(f"{len(runner.devices)} cells at a time on CUDA_VISIBLE_DEVICES {', '.join(map(str, runner.devices))}")
    start = time.perf_counter()
    try:
        stage1 = runner.run(plan_stage1(sweep), stage=1, metric=sweep.select["metric"])
        if runner.failed:
            raise RuntimeError(
                f"{len(runner.failed)} stage-1 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}"
            )
        stage2 = runner.run(plan_stage2(sweep, stage1), stage=2, metric=sweep.report)
    except SweepInterrupted as err:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted: {err}, their results kept in {out / 'cells'}; rerun "
            f"`mmpeft sweep {path}` to resume (only the missing cells run)"
        ) from None
    if runner.failed:
        raise RuntimeError(f"{len(runner.failed)} stage-2 cells failed (logs in {out / 'logs'}): {runner.failed[:3]}")
    table = write_results(sweep, out, stage1, stage2)
    log(f"\n{table}\nsweep {sweep.name}: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return table


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep file, e.g. experiments/vtab1k.yaml")
    p.add_argument("--parallel", type=int, default=None, help="cells at once, spread over the visible GPUs")
