"""`mmpeft`: the command line. `params` lists every method's trainable parameters on a backbone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmpeft.core.errors import MmpeftError
from mmpeft.core.method import create_method, get_method, list_methods
from mmpeft.core.model import PeftModel
from mmpeft.core.report import human, markdown_table, parameter_report

__all__ = ["main", "params_table"]


def params_table(backbone: str, num_classes: int = 100, preset: str = "default") -> list[dict]:
    """One row per registered method; full-size backbones are built on the meta device (no memory)."""
    from mmpeft.backbones import create_backbone  # noqa: PLC0415

    create_backbone(backbone, device="meta")  # a bad name fails here, once, with its own message
    rows = []
    for name in list_methods():
        row: dict = {"method": name}
        try:
            method = create_method(name, preset=preset)
            model = PeftModel(create_backbone(backbone, device="meta"), method, num_classes=num_classes)
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
                "note": f"{human(r.trainable_no_head)} of {human(r.backbone)}",
            }
        )
    return rows


def _params(args: argparse.Namespace) -> int:
    rows = params_table(args.backbone, args.num_classes, args.preset)
    print(f"# trainable parameters on {args.backbone} (head: {args.num_classes} classes, preset: {args.preset})\n")
    print(markdown_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="trainable-parameter table of every registered method on a backbone")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="mmpeft or timm backbone name")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the task head (default 100)")
    p.add_argument("--preset", default="default", help="'default' or 'paper' (methods without it are marked)")
    p.set_defaults(run=_params)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MmpeftError as err:
        print(f"mmpeft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
