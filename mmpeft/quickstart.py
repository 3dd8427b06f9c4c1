"""The digits transfer behind the quickstart: each method's downstream test accuracy from one config.

`python -m mmpeft.quickstart` prints the table in the README (random-weights probe, linear probe,
PEFT methods, full fine-tuning, training from scratch); tests run it on a reduced budget to check
that the quickstart is a real transfer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

# label -> (method spec, pretrained backbone?, learning rate)
RUNS: dict[str, tuple[Any, bool, float]] = {
    "linear probe, random weights": ("linear", False, 1e-2),
    "linear probe": ("linear", True, 1e-2),
    "bitfit": ("bitfit", True, 1e-2),
    "lora (quickstart)": (None, True, 3e-3),  # the config's own method
    "adapter": ({"name": "adapter", "bottleneck": 32, "scale": 1.0, "dropout": 0.0}, True, 3e-3),
    "full fine-tuning": ("full", True, 1e-3),
    "from scratch": ("full", False, 1e-3),
}


def run_one(method: Any, pretrained: bool, lr: float, epochs: int, runs_dir: str, name: str,
            pretrain_epochs: int | None = None, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Fit on the downstream split, then test once; returns accuracies and the trainable count."""
    from mmpeft.cli import run_cli  # noqa: PLC0415
    from mmpeft.core.report import parameter_report  # noqa: PLC0415

    args = [
        f"--config={CONFIG}", f"--seed_everything={seed}", f"--model.init_args.lr={lr}",
        f"--model.init_args.backbone.init_args.pretrained={str(pretrained).lower()}",
        f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false", f"--run.dir={runs_dir}",
        f"--run.name={name}", "--run.wandb=disabled", "--run.test_after_fit=false",
    ]  # fmt: skip
    if method is not None:
        args.append(f"--model.init_args.method={method if isinstance(method, str) else json.dumps(method)}")
    if pretrain_epochs:
        args.append(f"--model.init_args.backbone.init_args.epochs={pretrain_epochs}")
    cli = run_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    val = float(cli.trainer.callback_metrics["val/acc"])
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    return {"val_acc": val, "test_acc": float(test), "trainable": parameter_report(cli.model.model).trainable}


def transfer_table(epochs: int = 30, runs_dir: str = "runs/transfer", labels: list[str] | None = None,
                   pretrain_epochs: int | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    results = {}
    for label in labels or list(RUNS):
        method, pretrained, lr = RUNS[label]
        start = time.perf_counter()
        results[label] = run_one(method, pretrained, lr, epochs, runs_dir, label.replace(" ", "_").replace(",", ""),
                                 pretrain_epochs)  # fmt: skip
        results[label]["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs-dir", default="runs/transfer")
    args = parser.parse_args()
    results = transfer_table(args.epochs, args.runs_dir)
    print("| run | test acc | val acc | trainable | seconds |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['test_acc']:.3f} | {r['val_acc']:.3f} | {r['trainable']:,} | {r['seconds']} |")


if __name__ == "__main__":
    main()
