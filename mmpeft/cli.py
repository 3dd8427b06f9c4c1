"""`mmpeft`: the command line.

mmpeft fit|validate|test|predict -c CONFIG.yaml [--adapter FILE] [--ckpt_path CKPT]   (LightningCLI)
mmpeft params --backbone NAME      trainable-parameter table of every registered method
mmpeft bench  --backbone NAME      step time and peak memory per method, against the floor
mmpeft sweep  SWEEP.yaml           tasks x methods x seeds x grid: tune on val, retrain, test once
mmpeft methods [NAME]              the registered methods, or one method's options and presets
mmpeft backbones [FILTER]          the backbone names, their family and whether they take weights
mmpeft plot   CSV [CSV ...]        accuracy vs trainable parameters, or step time and memory, as PNGs
mmpeft export-lora ADAPTER --out DIR    an mmpeft UNet LoRA adapter as a diffusers LoRA file
mmpeft import-lora FILE --out ADAPTER   a diffusers / kohya LoRA file as an mmpeft adapter file
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


# -- params ------------------------------------------------------------------------------------------------


def params_table(backbone: str, num_classes: int = 100, preset: str = "default") -> list[dict]:
    """One row per registered method; full-size backbones are built on the meta device (no memory).

    A preset that some methods lack marks their rows; one that no method has raises UnknownName."""
    import difflib  # noqa: PLC0415

    from mmpeft.backbones import create_backbone  # noqa: PLC0415
    from mmpeft.core.errors import NotSupported, UnknownName  # noqa: PLC0415

    known = sorted({"default", *(p for name in list_methods() for p in get_method(name).presets)})
    if preset not in known:
        close = difflib.get_close_matches(preset, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownName(f"no method has preset {preset!r}{hint}; known presets: {', '.join(known)}")

    def build():  # quickstart backbones are small and built without their cached pretraining (counts only)
        from mmpeft.backbones.weights import WEIGHTS_BUILDERS  # noqa: PLC0415

        if backbone in WEIGHTS_BUILDERS:
            return create_backbone(backbone, pretrained=False)
        return create_backbone(backbone, device="meta")

    probe = build()  # a bad name fails here, once, with its own message
    classes = num_classes if getattr(probe, "num_features", 0) else None  # denoisers take no head
    rows = []
    for name in list_methods():
        row: dict = {"method": name}
        missing = {"trainable": "n/a", "no head": "n/a", "% of backbone": "n/a"}
        try:
            method = create_method(name, preset=preset)
        except UnknownName:  # this method lacks the preset
            rows.append({**row, **missing, "note": f"no preset {preset!r}"})
            continue
        try:
            model = PeftModel(build(), method, num_classes=classes)
        except MmpeftError as err:  # not supported on this backbone
            tokens = isinstance(err, NotSupported) and get_method(name).needs_tokens
            note = "needs a TokenBackbone" if tokens else str(err).split(";")[0][:80]
            rows.append({**row, **missing, "note": note})
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

    failed = [r for r in run_bench(args) if r.get("failed")]
    if failed:  # the other rows are written; a method not supported on the backbone is a row, not a failure
        lines = "\n".join(f"  {r['method']}: {r['error'].removeprefix('failed: ')}" for r in failed)
        print(f"mmpeft: error: bench: {len(failed)} method(s) failed in their worker:\n{lines}", file=sys.stderr)
        return 1
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mmpeft.sweep import run_sweep  # noqa: PLC0415

    run_sweep(args.sweep, args.parallel)
    return 0


# -- methods -----------------------------------------------------------------------------------------------


def _methods(args: argparse.Namespace) -> int:
    print(describe_methods() if args.name is None else describe_method(args.name))
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from mmpeft.backbones import describe_backbones  # noqa: PLC0415

    rows = describe_backbones(args.filter)
    if not rows:
        print(f"no backbone name, family or description contains {args.filter!r}; `mmpeft backbones` lists them all")
        return 0
    table = [{**row, "takes_weights": "yes" if row["takes_weights"] else "no (random, for tests)"} for row in rows]
    print(markdown_table(table, ["name", "family", "takes_weights", "description"]))
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
    from mmpeft.interop.commands import (  # noqa: PLC0415
        add_export_arguments,
        add_import_arguments,
        export_lora_command,
        import_lora_command,
    )

    e = sub.add_parser("export-lora", help="an mmpeft UNet LoRA adapter as a diffusers LoRA file (load_lora_weights)")
    add_export_arguments(e)
    e.set_defaults(run=export_lora_command)
    i = sub.add_parser("import-lora", help="a diffusers / kohya LoRA file as an mmpeft adapter file")
    add_import_arguments(i)
    i.set_defaults(run=import_lora_command)
    m = sub.add_parser("methods", help="the registered methods, or one method's options (with help) and presets")
    m.add_argument("name", nargs="?", default=None, help="a method name: list its options and presets")
    m.set_defaults(run=_methods)
    bb = sub.add_parser("backbones", help="the backbone names, their family and whether they take weights")
    bb.add_argument("filter", nargs="?", default=None, help="keep names, families or descriptions containing this")
    bb.set_defaults(run=_backbones)
    from mmpeft.plot import add_plot_arguments, plot_command  # noqa: PLC0415

    pl = sub.add_parser("plot", help="PNGs from result CSVs: accuracy vs trainable parameters, step time and memory")
    add_plot_arguments(pl)
    pl.set_defaults(run=plot_command)
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

    from mmpeft.core.files import writing  # noqa: PLC0415
    from mmpeft.run_checks import (  # noqa: PLC0415
        check_checkpoint_fits,
        check_resume_options,
        plain_config,
        refuse_untrained_evaluation,
        require_test_split,
    )
    from mmpeft.tasks import PeftTask  # noqa: PLC0415
    from mmpeft.tasks.callbacks import (  # noqa: PLC0415
        AdapterExport,
        NamingCheckpointIO,
        PredictionWriter,
        RunStats,
        TerminationCheckpoint,
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
            configured = trainer_config.get("callbacks") or []  # the user's (`--trainer.callbacks+=...`) stay
            configured = configured if isinstance(configured, list) else [configured]
            if trainer_config.get("plugins") is None:  # a user's own plugins (a CheckpointIO among them) are kept
                trainer_config["plugins"] = [NamingCheckpointIO()]
            extra = [AdapterExport(), RunStats(), TerminationCheckpoint(), PredictionWriter()]
            trainer_config["callbacks"] = [*configured, *kwargs.pop("callbacks", []), *extra]
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
            import torch  # noqa: PLC0415

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
            from pytorch_lightning.loggers import CSVLogger  # noqa: PLC0415

            run = config["run"]
            name = self._run_name(config)
            if self._resume is not None:
                from mmpeft.tasks.run_logs import ContinuedCSVLogger  # noqa: PLC0415

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
                from pytorch_lightning.loggers import WandbLogger  # noqa: PLC0415

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
                    self._resume = self._resume_point(ckpt)

        def _before_run(self) -> None:
            """Refuse what would quietly go wrong, then load the adapter (see `mmpeft.run_checks`)."""
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
    import math  # noqa: PLC0415

    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _wandb_run_id(log_dir: Path, resumed: bool) -> dict[str, Any]:
    """The W&B run of a version folder: a new id kept in `<run>/wandb/version_N.id` (beside W&B's own files, so
    the version folder stays empty until the run writes), or, on resume, that id again."""
    path = log_dir.parent / "wandb" / f"{log_dir.name}.id"
    if resumed and path.is_file():
        return {"id": path.read_text().strip(), "resume": "allow"}
    import secrets  # noqa: PLC0415
    import string  # noqa: PLC0415

    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))  # W&B's own id shape
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return {"id": run_id}


def backbones_epilog() -> str:
    """mmpeft's backbones, for `mmpeft fit --help` (jsonargparse's own list puts them among every torch module)."""
    from mmpeft.backbones import backbone_classes, backbone_names  # noqa: PLC0415

    return (
        f"backbones for --model.backbone: a NAME ({backbone_names()}, or a timm model name), or "
        f"{{class_path: CLASS, init_args: {{...}}}} with one of mmpeft's classes: {', '.join(backbone_classes())}"
    )


def claim_version(base: Path) -> int:
    """The next free N of `base/version_N`, its folder created at once: `mkdir` fails when the folder exists, so
    two runs of one name started together never share (or overwrite) a folder. Lightning's CSVLogger only lists
    the folders and creates its own at the first write, so both would take the same N.

    Ranks other than 0 of a multi-process run claim nothing: they get the newest folder (rank 0's, claimed before
    it launched them), and write no logs."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only  # noqa: PLC0415

    numbers = (p.name.removeprefix("version_") for p in base.glob("version_*"))
    newest = max((int(n) for n in numbers if n.isdigit()), default=-1)
    if getattr(rank_zero_only, "rank", 0) != 0:
        return max(newest, 0)
    base.mkdir(parents=True, exist_ok=True)
    version = newest + 1
    while True:
        try:
            (base / f"version_{version}").mkdir()
            return version
        except FileExistsError:  # another run took it between the listing and now
            version += 1


def _num_classes_of(datamodule: Any) -> int | None:
    return getattr(datamodule, "num_classes", None)


def run_cli(args: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI entry point (also used by tests and the sweep runner without a subprocess)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _make_cli_class()(args=args, run=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Errors are one line naming the problem (exit 2 for bad input, 1 for anything else); `--debug` or
    MMPEFT_DEBUG=1 shows the traceback instead. A run ended by SIGTERM exits 143, one ended by Ctrl-C 130."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MMPEFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if from_shell:
        sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv itself when run from a shell
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_cli(None if from_shell else argv)
            return 0
        args = build_own_parser().parse_args(argv)
        args.argv = argv  # the exact command, for result headers
        return args.run(args)
    except SystemExit as exit_:
        if type(exit_).__name__ == "SIGTERMException":  # Lightning's, a SystemExit with code 0
            return _terminated(argv)
        raise
    except KeyboardInterrupt as err:  # Ctrl-C: one line (a sweep's says what is done and how to resume), 130
        if debug:
            raise
        print(f"mmpeft: {str(err) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        message, code = one_line_error(err)
        print(f"mmpeft: error: {message}", file=sys.stderr)
        return code


def one_line_error(err: BaseException) -> tuple[str, int]:
    """(message, exit code): the mmpeft or file error behind `err`, a condensed command-line parse error, or
    the exception's first line with a pointer to `--debug`."""
    full = disk_full(err)
    if full is not None:
        return full, 1
    cause = user_error(err)
    if cause is not None:
        return str(cause), getattr(cause, "exit_code", 2)
    if type(err).__name__ == "ArgumentError":  # jsonargparse: a bad value, key or config file
        return condense_parse_error(str(err)), 2
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first} (run with --debug or MMPEFT_DEBUG=1 for the traceback)", 1


def disk_full(err: BaseException) -> str | None:
    """The message of a full disk behind `err`: mmpeft's `DiskFull` (it names the file), else the file the
    `OSError` knows, else "a run file" (a write by Lightning or W&B that names none)."""
    from mmpeft.core.errors import DiskFull  # noqa: PLC0415
    from mmpeft.core.files import disk_full_message, disk_full_reason  # noqa: PLC0415

    found, cause = disk_full_reason(err), err
    if found is None:
        return None
    while cause is not None and not isinstance(cause, DiskFull):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return str(cause)
    reason, filename = found
    return disk_full_message(str(filename) if filename else "a run file", reason)


def condense_parse_error(text: str) -> str:
    """jsonargparse's nested report ("Parser key "model": Does not validate against any of the Union subtypes
    ... Parser key "lr": Expected a <class 'float'>. Got value: abc") as "model.lr: expected float, got 'abc'"."""
    import re  # noqa: PLC0415

    keys = re.findall(r'Parser key "([^"]+)"', text)
    failed = unimportable_class_path(text)
    if failed:
        where = ".".join(dict.fromkeys(keys))
        return f"{where}: {failed} (see `mmpeft fit --help`)" if where else f"{failed} (see `mmpeft fit --help`)"
    noise = ("Parser key", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    lines = [line.strip().lstrip("- ") for line in text.splitlines()]
    reasons = [line for line in lines if line and "Union subtypes" not in line and not line.startswith(noise)]
    reason = reasons[-1] if reasons else text.strip().splitlines()[-1]
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).lstrip("- ")
    where = ".".join(dict.fromkeys(keys))
    return f"{where}: {reason} (see `mmpeft fit --help`)" if where else f"{reason} (see `mmpeft fit --help`)"


IMPORT_FAILURES = ("has no attribute", "No module named", "Expected a dot import path", "does not correspond")


def unimportable_class_path(text: str) -> str | None:
    """A "no class 'X' (its import error); did you mean Y?" line for the innermost `class_path` of a jsonargparse report
    that failed to import (a typo), with the closest of mmpeft's backbone, task and data classes."""
    import difflib  # noqa: PLC0415
    import re  # noqa: PLC0415

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
    import inspect  # noqa: PLC0415

    from mmpeft import data, tasks  # noqa: PLC0415
    from mmpeft.backbones import backbone_classes  # noqa: PLC0415

    public = [f"{m.__name__}.{n}" for m in (tasks, data) for n in m.__all__ if inspect.isclass(getattr(m, n))]
    return [*backbone_classes(), *public]


def _terminated(argv: Sequence[str]) -> int:
    """A run ended by SIGTERM exits 143 (128 + 15), so schedulers record a failure, and says how to resume."""
    from mmpeft.tasks.callbacks import TerminationCheckpoint  # noqa: PLC0415

    saved = TerminationCheckpoint.last_path
    args = [a for a in argv if not a.startswith("--ckpt_path")]
    if saved is not None:
        print(f"mmpeft: terminated by SIGTERM; a resumable checkpoint is at {saved}\n"
              f"  resume with: mmpeft {' '.join(args)} --ckpt_path {saved}", file=sys.stderr)  # fmt: skip
    else:
        print("mmpeft: terminated by SIGTERM before training started; nothing to resume", file=sys.stderr)
    return 143


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
