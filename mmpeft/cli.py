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
mmpeft sample --run RUN --prompt P      images from a diffusion run through diffusers' pipelines, and a grid PNG
mmpeft export --run RUN --format F      a diffusion run as a merged diffusers folder or a diffusers LoRA file
mmpeft score SAMPLES --reference REAL   CLIP-T, CLIP-I, DINO and FID of generated images, from local weights
mmpeft bank -c CONFIG [fit options]     a method's derived state from the training data (Point-PEFT's memory bank)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from mmpeft.core.errors import MmpeftError
from mmpeft.core.method import create_method, get_method, list_methods
from mmpeft.core.model import PeftModel
from mmpeft.core.report import human, markdown_table, parameter_report
from mmpeft.lab.lightning_cli import LIGHTNING_COMMANDS, condense_parse_error, finite_or_none, run_cli
from mmpeft.lab.records import claim_version, wandb_mode
from mmpeft.methods.info import describe_method, describe_methods

# run_cli, wandb_mode, claim_version and finite_or_none live in the lab; re-exported for old imports
__all__ = ["main", "params_table", "run_cli", "wandb_mode", "claim_version", "finite_or_none"]


# -- params ------------------------------------------------------------------------------------------------


def params_table(backbone: str, num_classes: int = 100, preset: str = "default") -> list[dict]:
    """One row per registered method; full-size backbones are built on the meta device (no memory).

    A preset that some methods lack marks their rows; one that no method has raises UnknownName."""
    import difflib

    from mmpeft.backbones.registry import create_without_pretraining
    from mmpeft.core.errors import NotSupported, UnknownName

    known = sorted({"default", *(p for name in list_methods() for p in get_method(name).presets)})
    if preset not in known:
        close = difflib.get_close_matches(preset, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownName(f"no method has preset {preset!r}{hint}; known presets: {', '.join(known)}")

    def build():  # full-size backbones on the meta device; quickstart ones small and without their pretraining
        return create_without_pretraining(backbone, device="meta")

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
    from mmpeft.lab.bench import run_bench

    failed = [r for r in run_bench(args) if r.get("failed")]
    if failed:  # the other rows are written; a method not supported on the backbone is a row, not a failure
        lines = "\n".join(f"  {r['method']}: {r['error'].removeprefix('failed: ')}" for r in failed)
        print(f"mmpeft: error: bench: {len(failed)} method(s) failed in their worker:\n{lines}", file=sys.stderr)
        return 1
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mmpeft.lab.sweep import run_sweep

    run_sweep(args.sweep, args.parallel, launcher=args.launcher, slurm=args.slurm, detach=args.detach)
    return 0


# -- methods -----------------------------------------------------------------------------------------------


def _methods(args: argparse.Namespace) -> int:
    print(describe_methods() if args.name is None else describe_method(args.name))
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from mmpeft.backbones import describe_backbones

    rows = describe_backbones(args.filter)
    if not rows:
        print(f"no backbone name, family or description contains {args.filter!r}; `mmpeft backbones` lists them all")
        return 0
    table = [{**row, "takes_weights": "yes" if row["takes_weights"] else "no (random, for tests)"} for row in rows]
    print(markdown_table(table, ["name", "family", "takes_weights", "description"]))
    return 0


def _module_commands() -> list[tuple[str, str, Any, Any]]:
    """(name, help, add_arguments, run) of the commands whose arguments and work live in their own modules."""
    from mmpeft.interop.commands import (
        add_export_arguments,
        add_import_arguments,
        export_lora_command,
        import_lora_command,
    )
    from mmpeft.lab.bank import add_bank_arguments, bank_command
    from mmpeft.lab.bench import add_bench_arguments
    from mmpeft.lab.export import add_model_export_arguments, model_export_command
    from mmpeft.lab.plot import add_plot_arguments, plot_command
    from mmpeft.lab.sample import add_sample_arguments, sample_command
    from mmpeft.lab.score import add_score_arguments, score_command
    from mmpeft.lab.sweep import add_sweep_arguments

    return [
        ("bench", "median step time and peak memory of every method, next to the floor", add_bench_arguments, _bench),
        ("sweep", "tasks x methods x seeds x search grid: tune on val, retrain, test once", add_sweep_arguments,
         _sweep),
        ("export-lora", "an mmpeft UNet LoRA adapter as a diffusers LoRA file (load_lora_weights)",
         add_export_arguments, export_lora_command),
        ("import-lora", "a diffusers / kohya LoRA file as an mmpeft adapter file", add_import_arguments,
         import_lora_command),
        ("bank", "a method's derived state from its run's training data (Point-PEFT's memory bank), no training",
         add_bank_arguments, bank_command),
        ("sample", "images (and a grid PNG) from a diffusion run through diffusers' pipelines", add_sample_arguments,
         sample_command),
        ("export", "a diffusion run as a merged diffusers folder or a diffusers LoRA file", add_model_export_arguments,
         model_export_command),
        ("score", "CLIP-T, CLIP-I, DINO and FID of generated images, from local weights", add_score_arguments,
         score_command),
        ("plot", "PNGs from result CSVs: accuracy vs trainable parameters, step time and memory", add_plot_arguments,
         plot_command),
    ]  # fmt: skip


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
    for name, help_text, add_arguments, run in _module_commands():
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    m = sub.add_parser("methods", help="the registered methods, or one method's options (with help) and presets")
    m.add_argument("name", nargs="?", default=None, help="a method name: list its options and presets")
    m.set_defaults(run=_methods)
    bb = sub.add_parser("backbones", help="the backbone names, their family and whether they take weights")
    bb.add_argument("filter", nargs="?", default=None, help="keep names, families or descriptions containing this")
    bb.set_defaults(run=_backbones)
    return parser


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
        parser = build_own_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # `fit`-style options for commands that build a run from its config (`bank`)
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
    from mmpeft.core.errors import DiskFull
    from mmpeft.core.files import disk_full_message, disk_full_reason

    found, cause = disk_full_reason(err), err
    if found is None:
        return None
    while cause is not None and not isinstance(cause, DiskFull):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return str(cause)
    reason, filename = found
    return disk_full_message(str(filename) if filename else "a run file", reason)


def _terminated(argv: Sequence[str]) -> int:
    """A run ended by SIGTERM exits 143 (128 + 15), so schedulers record a failure, and says how to resume."""
    from mmpeft.tasks.callbacks import TerminationCheckpoint

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
