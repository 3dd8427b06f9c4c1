"""`mmpeft`: the command line.

mmpeft fit|validate|test|predict -c CONFIG.yaml [--adapter FILE] [--ckpt_path CKPT]   (LightningCLI)
mmpeft params --backbone NAME      trainable-parameter table of every registered method
mmpeft bench  --backbone NAME      step time and peak memory per method, against the floor
mmpeft methods [NAME]              the registered methods, or one method's options and presets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpeft.core.errors import MmpeftError
from mmpeft.core.method import create_method, get_method, list_methods
from mmpeft.core.model import PeftModel
from mmpeft.core.report import human, markdown_table, parameter_report
from mmpeft.method_info import describe_method, describe_methods, methods_epilog

__all__ = ["main", "params_table", "run_cli", "wandb_mode"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
OWN_COMMANDS = ("params", "bench", "sweep", "methods")


# -- params ------------------------------------------------------------------------------------------------


def params_table(backbone: str, num_classes: int = 100, preset: str = "default") -> list[dict]:
    """One row per registered method; full-size backbones are built on the meta device (no memory)."""
    from mmpeft.backbones import create_backbone  # noqa: PLC0415

    probe = create_backbone(backbone, device="meta")  # a bad name fails here, once, with its own message
    classes = num_classes if getattr(probe, "num_features", 0) else None  # denoisers take no head
    rows = []
    for name in list_methods():
        row: dict = {"method": name}
        try:
            method = create_method(name, preset=preset)
            model = PeftModel(create_backbone(backbone, device="meta"), method, num_classes=classes)
        except MmpeftError as err:  # not supported on this backbone, or no such preset
            note = "needs a TokenBackbone" if get_method(name).needs_tokens else str(err).split(";")[0][:80]
            rows.append({**row, "trainable": "n/a", "no head": "n/a", "% of backbone": "n/a", "note": note})
            continue
        r = parameter_report(model)
        rows.append(
            {
                **row,
                "trainable": r.trainable,
                "no head": r.trainable_no_head,
                "% of backbone": f"{r.percent:.3f}",
                "at inference": method.inference_params(model.backbone),
                "note": f"{human(r.trainable_no_head)} of {human(r.backbone)}",
            }
        )
    return rows


def _params(args: argparse.Namespace) -> int:
    rows = params_table(args.backbone, args.num_classes, args.preset)
    head = f"{args.num_classes} classes" if any(r.get("no head") != r.get("trainable") for r in rows) else "none"
    print(f"# trainable parameters on {args.backbone} (head: {head}, preset: {args.preset})\n")
    print(markdown_table(rows))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mmpeft.bench import run_bench  # noqa: PLC0415

    run_bench(args)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mmpeft.sweep import run_sweep  # noqa: PLC0415

    run_sweep(args.sweep, args.parallel)
    return 0


# -- methods -----------------------------------------------------------------------------------------------


def _methods(args: argparse.Namespace) -> int:
    print(describe_methods() if args.name is None else describe_method(args.name))
    return 0


def build_own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpeft", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in LIGHTNING_COMMANDS:
        sub.add_parser(command, help=f"LightningCLI {command} (see `mmpeft {command} --help`)", add_help=False)
    p = sub.add_parser("params", help="trainable-parameter table of every registered method on a backbone")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="mmpeft or timm backbone name")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the task head (default 100)")
    p.add_argument("--preset", default="default", help="'default' or 'paper' (methods without it are marked)")
    p.set_defaults(run=_params)
    from mmpeft.bench import add_bench_arguments  # noqa: PLC0415

    b = sub.add_parser("bench", help="median step time and peak memory of every method, next to the floor")
    add_bench_arguments(b)
    b.set_defaults(run=_bench)
    from mmpeft.sweep import add_sweep_arguments  # noqa: PLC0415

    s = sub.add_parser("sweep", help="tasks x methods x seeds x search grid: tune on val, retrain, test once")
    add_sweep_arguments(s)
    s.set_defaults(run=_sweep)
    m = sub.add_parser("methods", help="the registered methods, or one method's options (with help) and presets")
    m.add_argument("name", nargs="?", default=None, help="a method name: list its options and presets")
    m.set_defaults(run=_methods)
    return parser


# -- LightningCLI ------------------------------------------------------------------------------------------


def wandb_mode(requested: str = "auto") -> str:
    """'disabled' | 'offline' | 'online'. auto: WANDB_MODE if set, else online only with an API key."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "offline", "online", "dryrun"):
        return "offline" if env == "dryrun" else env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read():
        return "online"
    return "offline"


def _make_cli_class():
    from pytorch_lightning import LightningDataModule  # noqa: PLC0415
    from pytorch_lightning.cli import LightningCLI, SaveConfigCallback  # noqa: PLC0415

    from mmpeft.tasks import PeftTask  # noqa: PLC0415
    from mmpeft.tasks.callbacks import AdapterExport, RunStats, human_bytes, run_dir  # noqa: PLC0415

    class RunConfig(SaveConfigCallback):
        """Saves the config in the run's own version directory and sends it to W&B."""

        def save_config(self, trainer, pl_module, stage) -> None:
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

    class MmpeftCLI(LightningCLI):
        def __init__(self, args: Sequence[str] | None = None, run: bool = True):
            super().__init__(
                PeftTask,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=RunConfig,
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_kwargs={"default_env": True, **{c: {"epilog": methods_epilog()} for c in LIGHTNING_COMMANDS}},
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
            extra = [AdapterExport(), RunStats()]
            return super().instantiate_trainer(**{**kwargs, "callbacks": [*kwargs.get("callbacks", []), *extra]})

        def _loggers(self, config: Any) -> list:
            from pytorch_lightning.loggers import CSVLogger  # noqa: PLC0415

            run = config["run"]
            name = (
                run["name"] or f"{self.model.method.name}-{type(self.datamodule).__name__.removesuffix('DataModule')}"
            )
            csv = CSVLogger(save_dir=run["dir"], name=name)
            loggers = [csv]
            mode = wandb_mode(run["wandb"])
            if mode != "disabled":
                from pytorch_lightning.loggers import WandbLogger  # noqa: PLC0415

                loggers.append(
                    WandbLogger(
                        name=f"{name}/version_{csv.version}",
                        save_dir=str(Path(csv.log_dir).parent),
                        project=run["project"],
                        group=run["group"],
                        offline=mode == "offline",
                        tags=[self.model.method.name, *run["tags"]],
                    )  # fmt: skip
                )
            return loggers

        def _load_adapter(self) -> None:
            path = self._run_options().get("adapter")
            if path:
                self.model.load_adapter(path)

        before_fit = before_validate = before_test = before_predict = _load_adapter

        def _metrics(self) -> dict[str, float]:
            return {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}

        def after_fit(self) -> None:
            metrics = self._metrics()  # testing replaces the callback metrics: keep the fit's
            if self._run_options()["run"]["test_after_fit"] and not self.trainer.fast_dev_run:
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                metrics.update(self._metrics())
            self._summary(metrics)

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
                Path(log_dir, "summary.json").write_text(json.dumps(summary, indent=1))
            print("\n".join(["", "=" * 60, *lines, "=" * 60]))

    return MmpeftCLI


def _num_classes_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "num_classes", None)


def run_cli(args: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI entry point (also used by tests and the sweep runner without a subprocess)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _make_cli_class()(args=args, run=run)


def main(argv: Sequence[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_cli(None if from_shell else argv)  # LightningCLI reads sys.argv itself when run from a shell
            return 0
        args = build_own_parser().parse_args(argv)
        return args.run(args)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"mmpeft: error: {cause}", file=sys.stderr)
        return 2


def user_error(err: BaseException) -> BaseException | None:
    """The mmpeft or missing-file error behind `err`, unwrapping what jsonargparse wraps around it."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, MmpeftError | FileNotFoundError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


if __name__ == "__main__":
    sys.exit(main())
