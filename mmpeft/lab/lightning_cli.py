"""`mmpeft fit|validate|test|predict`: mmpeft's LightningCLI — run folders and loggers, the saved config, the
checks that refuse a run that would quietly go wrong, the end-of-run summary — and `build_parser`, the same
parser for checking configs without running anything (sweep pre-flight checks, config tests)."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpeft.core.report import parameter_report
from mmpeft.lab.records import claim_version, wandb_mode
from mmpeft.methods.info import methods_epilog

__all__ = ["LIGHTNING_COMMANDS", "cli_class", "build_parser", "run_cli", "condense_parse_error", "finite_or_none"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


@functools.cache
def cli_class():
    """The LightningCLI subclass (built on first use: importing Lightning and the tasks is slow)."""
    return _make_cli_class()


def _make_cli_class():
    from pytorch_lightning import LightningDataModule
    from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

    from mmpeft.core.files import writing
    from mmpeft.lab.run_checks import (
        check_checkpoint_fits,
        check_resume_options,
        plain_config,
        refuse_untrained_evaluation,
        require_test_split,
    )
    from mmpeft.tasks import PeftTask
    from mmpeft.tasks.callbacks import (
        AdapterExport,
        NamingCheckpointIO,
        default_callback_classes,
        default_callbacks,
        human_bytes,
        run_dir,
    )

    class RunConfig(SaveConfigCallback):
        """Saves the config in the run's own version directory (a resumed run beside the first one's, as
        `config-resume-<k>.yaml`), sends it to W&B, and keeps it in every checkpoint (so a resume can be checked
        against it)."""

        def setup(self, trainer, pl_module, stage) -> None:
            folder = run_dir(trainer)
            if stage == "fit" and getattr(trainer, "mmpeft_resumed", False) and (folder / "config.yaml").is_file():
                taken = len(list(folder.glob("config-resume-*.yaml")))
                self.config_filename = f"config-resume-{taken + 1}.yaml"
            super().setup(trainer, pl_module, stage)

        def save_config(self, trainer, pl_module, stage) -> None:
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            checkpoint["run_config"] = plain_config(self.config)

    class MmpeftCLI(LightningCLI):
        def __init__(self, args: Sequence[str] | None = None, run: bool = True):
            epilog = f"{methods_epilog()}\n\n{backbones_epilog()}"
            super().__init__(
                PeftTask,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=RunConfig,
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_kwargs={
                    "default_env": True,
                    "exit_on_error": False,  # parse errors reach `main` as one line, not a usage dump
                    **{c: {"epilog": epilog, "exit_on_error": False} for c in LIGHTNING_COMMANDS},
                },
                args=args,
                run=run,
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--adapter", type=str | None, default=None, help="adapter file to evaluate or continue")
            parser.add_argument("--run.name", type=str | None, default=None, help="run name (default: method-data)")
            parser.add_argument("--run.dir", type=str, default="runs", help="where runs/<name>/version_N/ go")
            parser.add_argument("--run.wandb", type=str, default="auto", help="auto | offline | online | disabled")
            parser.add_argument("--run.project", type=str, default="mmpeft", help="W&B project")
            parser.add_argument("--run.group", type=str | None, default=None, help="W&B group (sweeps)")
            parser.add_argument("--run.tags", type=list[str], default=[], help="W&B tags")
            parser.add_argument("--run.test_after_fit", type=bool, default=False, help="test the final model")
            parser.set_defaults({"trainer.callbacks": default_callbacks()})  # configurable, removable
            parser.link_arguments(  # only datamodules with classes have num_classes; others give no head
                "data", "model.init_args.num_classes", _num_classes_of, apply_on="instantiate"
            )

        def _run_options(self) -> Any:
            return self.config[self.subcommand] if self.subcommand else self.config

        def instantiate_trainer(self, **kwargs: Any):
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer_config = config["trainer"]
            if trainer_config.get("logger") in (None, True):
                trainer_config["logger"] = self._loggers(config)
            elif trainer_config.get("logger") is False and not trainer_config.get("default_root_dir"):
                trainer_config["default_root_dir"] = str(self._unlogged_run_dir(config))  # never the cwd
            configured = trainer_config.get("callbacks")  # the defaults, plus or instead of the user's
            if (
                configured is None
            ):  # `callbacks: null` (run configs saved before the defaults): the defaults; [] is none
                configured = [callback() for callback in default_callback_classes()]
            configured = configured if isinstance(configured, list) else [configured]
            if trainer_config.get("plugins") is None:  # a user's own plugins (a CheckpointIO among them) are kept
                trainer_config["plugins"] = [NamingCheckpointIO()]
            trainer_config["callbacks"] = [*configured, *kwargs.pop("callbacks", [])]
            trainer = super().instantiate_trainer(**kwargs)
            trainer.mmpeft_resumed = self._resume is not None  # read by RunConfig: the config file's name
            return trainer

        _resume: tuple[Path, int] | None = None  # (the version folder a fit continues, the checkpoint's step)

        def _resume_point(self, ckpt: str) -> tuple[Path, int] | None:
            """A checkpoint inside a run folder (`<dir>/<name>/version_N/checkpoints/X.ckpt`) continues that
            folder: its metrics, config and adapter files, not a new version."""
            path = Path(ckpt).resolve()
            version = path.parent.parent
            if path.parent.name != "checkpoints" or not version.name.startswith("version_"):
                return None
            if not version.name.removeprefix("version_").isdigit():
                return None
            import torch

            step = int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))
            return version, step

        def _run_name(self, config: Any) -> str:
            default = f"{self.model.method.name}-{type(self.datamodule).__name__.removesuffix('DataModule')}"
            return config["run"]["name"] or default

        def _unlogged_run_dir(self, config: Any) -> Path:
            """`runs/<name>/version_N` for a run with `--trainer.logger false` (the next free N, claimed; a
            resumed run's own folder)."""
            if self._resume is not None:
                return self._resume[0]
            base = Path(config["run"]["dir"]) / self._run_name(config)
            return base / f"version_{claim_version(base)}"

        def _loggers(self, config: Any) -> list:
            from pytorch_lightning.loggers import CSVLogger

            run = config["run"]
            name = self._run_name(config)
            if self._resume is not None:
                from mmpeft.tasks.run_logs import ContinuedCSVLogger

                version, step = self._resume
                name = version.parent.name
                number, root = int(version.name.removeprefix("version_")), str(version.parent.parent)
                csv = ContinuedCSVLogger(save_dir=root, name=name, version=number, until_step=step)
                print(f"resuming run {version} from step {step}: its metrics continue there")
            else:
                csv = CSVLogger(save_dir=run["dir"], name=name, version=claim_version(Path(run["dir"]) / name))
            loggers = [csv]
            mode = wandb_mode(run["wandb"])
            if mode != "disabled":
                from pytorch_lightning.loggers import WandbLogger

                loggers.append(
                    WandbLogger(
                        name=f"{name}/version_{csv.version}",
                        save_dir=str(Path(csv.log_dir).parent),
                        project=run["project"],
                        group=run["group"],
                        offline=mode == "offline",
                        tags=[self.model.method.name, *run["tags"]],
                        **_wandb_run_id(Path(csv.log_dir), resumed=self._resume is not None),
                    )  # fmt: skip
                )
            return loggers

        def _parse_ckpt_path(self) -> None:
            """Lightning would overwrite the model config with the checkpoint's hyper-parameters; keep the config
            and refuse a checkpoint that does not fit it (see `check_checkpoint_fits`)."""
            subcommand = self.config.get("subcommand")
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt:
                check_checkpoint_fits(self.config[subcommand]["model"], ckpt)
                if subcommand == "fit":
                    for note in check_resume_options(self.config[subcommand], ckpt):
                        print(f"resuming: {note}")
                    if not _has_callback(self.config[subcommand]["trainer"].get("callbacks"), "RNGStateCheckpoint"):
                        warnings.warn(
                            "resuming without the RNGStateCheckpoint callback (it is not in trainer.callbacks): the "
                            "random draws (dropout, drop-path, augmentation) restart from the seed, so the resumed "
                            "run is not exact; keep mmpeft.tasks.rng.RNGStateCheckpoint among the callbacks",
                            UserWarning,
                            stacklevel=2,
                        )
                    self._resume = self._resume_point(ckpt)

        def _before_run(self) -> None:
            """Refuse what would quietly go wrong, then load the adapter (see `mmpeft.lab.run_checks`)."""
            options = self._run_options()
            adapter, ckpt = options.get("adapter"), options.get("ckpt_path")
            if adapter:
                self.model.load_adapter(adapter)
            if self.subcommand in ("validate", "test", "predict") and not (adapter or ckpt):
                refuse_untrained_evaluation(self.model, self.subcommand)
            if self.subcommand == "fit" and options["run"]["test_after_fit"]:
                require_test_split(self.datamodule)

        before_fit = before_validate = before_test = before_predict = _before_run

        def _metrics(self) -> dict[str, float]:
            return {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}

        def after_fit(self) -> None:
            metrics = self._metrics()  # testing replaces the callback metrics: keep the fit's
            if self._run_options()["run"]["test_after_fit"] and not self.trainer.fast_dev_run:
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                metrics.update(self._metrics())
            self._summary(metrics)
            self._finish_wandb()

        def after_validate(self) -> None:
            self._finish_wandb()

        def after_test(self) -> None:
            self._finish_wandb()

        def after_predict(self) -> None:
            self._finish_wandb()

        def _finish_wandb(self) -> None:
            """End the command's W&B run. Lightning leaves it open, and in a process that runs more (the transfer
            tables, tests) the next `wandb.init` would inherit its folder instead of its own."""
            for logger in self.trainer.loggers:
                if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
                    logger.experiment.finish()

        def _summary(self, metrics: dict[str, float]) -> None:
            """The end-of-run report and `summary.json`, on rank 0 only (no collectives in here)."""
            if not self.trainer.is_global_zero:
                return
            report = parameter_report(self.model.model)
            export = next((c for c in self.trainer.callbacks if isinstance(c, AdapterExport)), None)
            monitor, mode = self.model.monitor, self.model.monitor_mode
            lines = [f"method {report.method}: {report.trainable:,} trainable parameters "
                     f"({report.trainable_no_head:,} without head)"]  # fmt: skip
            test_key = monitor.replace("val/", "test/", 1)
            for key in dict.fromkeys((monitor, test_key)):
                if key in metrics:
                    lines.append(f"{key}: {metrics[key]:.4f}" + (f" ({mode} is better)" if key == monitor else ""))
            if export is not None and export.last_path is not None:
                lines.append(f"adapter file: {export.last_path} ({human_bytes(export.last_bytes)})")
            log_dir = run_dir(self.trainer)
            metrics = finite_or_none(metrics)
            if log_dir:
                lines.append(f"run directory: {log_dir}")
                summary = {
                    "method": report.method,
                    "monitor": monitor,
                    "monitor_mode": mode,
                    "metrics": metrics,
                    "val_acc": metrics.get("val/acc"),  # the pre-monitor keys, kept for old readers
                    "test_acc": metrics.get("test/acc"),
                    "trainable": report.trainable,
                    "trainable_no_head": report.trainable_no_head,
                    "global_step": self.trainer.global_step,
                    "adapter": str(export.last_path) if export and export.last_path else None,
                    "adapter_bytes": export.last_bytes if export else 0,
                }
                with writing(Path(log_dir, "summary.json"), "the run summary"):
                    Path(log_dir, "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
            print("\n".join(["", "=" * 60, *lines, "=" * 60]))

    return MmpeftCLI


def finite_or_none(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for JSON: NaN and inf become null (a bare NaN is not JSON)."""
    import math

    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _wandb_run_id(log_dir: Path, resumed: bool) -> dict[str, Any]:
    """The W&B run of a version folder: a new id kept in `<run>/wandb/version_N.id` (beside W&B's own files, so
    the version folder stays empty until the run writes), or, on resume, that id again."""
    path = log_dir.parent / "wandb" / f"{log_dir.name}.id"
    if resumed and path.is_file():
        return {"id": path.read_text().strip(), "resume": "allow"}
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))  # W&B's own id shape
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return {"id": run_id}


def backbones_epilog() -> str:
    """mmpeft's backbones, for `mmpeft fit --help` (jsonargparse's own list puts them among every torch module)."""
    from mmpeft.backbones import backbone_classes, backbone_names

    return (
        f"backbones for --model.backbone: a NAME ({backbone_names()}, or a timm model name), or "
        f"{{class_path: CLASS, init_args: {{...}}}} with one of mmpeft's classes: {', '.join(backbone_classes())}"
    )


def _num_classes_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "num_classes", None)


def run_cli(args: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI entry point (also used by tests and the sweep runner without a subprocess)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class()(args=args, run=run)


def _has_callback(callbacks: Any, class_name: str) -> bool:
    """Whether a parsed `trainer.callbacks` value names a callback of `class_name`."""
    entries = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
    paths = [
        str(getattr(e, "class_path", None) or (e.get("class_path") if isinstance(e, dict) else e)) for e in entries
    ]
    return any(path.rsplit(".", 1)[-1] == class_name for path in paths)


class _ParserBuilt(Exception):
    """Carries the parser out of a CLI stopped before it parses anything."""


@functools.cache
def build_parser():
    """mmpeft's LightningCLI parser (every subcommand, with the `run.*` options), built once and never run:
    parsing checks every key and value against the classes' signatures without instantiating anything (no
    backbone is built, no weights or data are read). Parse errors raise (they do not exit)."""

    class ParserOnly(cli_class()):
        def parse_arguments(self, parser, args) -> None:  # LightningCLI's hook: stop before parsing
            raise _ParserBuilt(parser)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            ParserOnly(args=[], run=True)
    except _ParserBuilt as built:
        return built.args[0]
    raise RuntimeError("LightningCLI no longer calls parse_arguments")  # pragma: no cover


def condense_parse_error(text: str, hint: bool = True) -> str:
    """jsonargparse's nested report ("Parser key "model": Does not validate against any of the Union subtypes
    ... Parser key "lr": Expected a <class 'float'>. Got value: abc") as "model.lr: expected float, got 'abc'";
    `hint` adds the pointer to `mmpeft fit --help`."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', text)
    pointer = " (see `mmpeft fit --help`)" if hint else ""
    failed = unimportable_class_path(text)
    if failed:
        where = ".".join(dict.fromkeys(keys))
        return f"{where}: {failed}{pointer}" if where else f"{failed}{pointer}"
    noise = ("Parser key", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    lines = [line.strip().lstrip("- ") for line in text.splitlines()]
    reasons = [line for line in lines if line and "Union subtypes" not in line and not line.startswith(noise)]
    reason = reasons[-1] if reasons else text.strip().splitlines()[-1]
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).lstrip("- ")
    where = ".".join(dict.fromkeys(keys))
    return f"{where}: {reason}{pointer}" if where else f"{reason}{pointer}"


IMPORT_FAILURES = ("has no attribute", "No module named", "Expected a dot import path", "does not correspond")


def unimportable_class_path(text: str) -> str | None:
    """A "no class 'X' (its import error); did you mean Y?" line for the innermost `class_path` of a jsonargparse report
    that failed to import (a typo), with the closest of mmpeft's backbone, task and data classes."""
    import difflib
    import re

    failures = [(path, reason.strip()) for path, reason in
                re.findall(r"Problem with given class_path '([^']+)':\s*\n\s*([^\n]+)", text)
                if any(marker in reason for marker in IMPORT_FAILURES)]  # fmt: skip
    if not failures:
        return None
    path, reason = failures[-1]
    close = difflib.get_close_matches(path, mmpeft_classes(), n=3, cutoff=0.8)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"no class {path!r} ({reason}){hint}"


def mmpeft_classes() -> list[str]:
    """The class paths a config names: mmpeft's backbones, tasks and data modules."""
    import inspect

    from mmpeft import data, tasks
    from mmpeft.backbones import backbone_classes

    public = [f"{m.__name__}.{n}" for m in (tasks, data) for n in m.__all__ if inspect.isclass(getattr(m, n))]
    return [*backbone_classes(), *public]
