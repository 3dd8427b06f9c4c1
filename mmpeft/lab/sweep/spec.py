"""A sweep file: its schema, loading and the fingerprints that tie results to the configs they ran."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.errors import MmpeftError

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
        return {"content": data, "refers": [content(ref) for ref in referred_files(data, path.parent, seen)]}

    tree = [content(Path(p)) for p in paths]
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def referred_files(data: Any, folder: Path, seen: set[Path]) -> list[Path]:
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
    task_key: str | None = "data.init_args.task"  # None: a task is a label its override rules give meaning to
    root_key: str = "data.init_args.root"
    protocol_key: str | None = "data.init_args.protocol"  # None: the data has no tune / final protocols
    seed_keys: list[str] = field(default_factory=list)  # dotted keys that take the cell's seed too (shot_seed)
    protocols: tuple[str, str] = ("tune", "final")
    metadata: str | None = "vtab1k"  # dataset metadata with task groups (None: no groups)
    out: str = "runs/sweeps"
    parallel: int = 1
    wandb: str = "auto"
    select: dict[str, str] = field(default_factory=lambda: dict(SELECT_DEFAULT))  # stage 1: metric and mode
    report: str | None = None  # stage 2's metric in results.md; None: `select.metric` with val/ -> test/
    slurm: dict[str, Any] = field(default_factory=dict)  # a cell's job resources (`mmpeft.lab.sweep.launch`)

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
