"""The transfers behind the quickstarts: each method's downstream test accuracy from one config.

`python -m mmpeft.quickstart` (digits) and `python -m mmpeft.quickstart --task shapes` (point clouds)
print the tables in the README (random-weights probe, linear probe, PEFT methods, full fine-tuning,
training from scratch); tests run them on a reduced budget to check that each quickstart is a real
transfer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = CONFIGS / "quickstart.yaml"

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
SHAPES_RUNS: dict[str, tuple[Any, bool, float]] = {
    "linear probe, random weights": ("linear", False, 1e-2),
    "linear probe": ("linear", True, 1e-2),
    "bitfit": ("bitfit", True, 1e-2),
    "lora (quickstart)": (None, True, 1e-2),  # the config's lr, chosen on val from {1e-3, 3e-3, 1e-2}
    "adapter": ({"name": "adapter", "bottleneck": 16, "scale": 1.0, "dropout": 0.0}, True, 3e-3),
    "full fine-tuning": ("full", True, 1e-3),
    "from scratch": ("full", False, 1e-3),
}
# task -> (config, runs)
QUICKSTARTS: dict[str, tuple[Path, dict[str, tuple[Any, bool, float]]]] = {
    "digits": (CONFIG, RUNS),
    "shapes": (CONFIGS / "point" / "quickstart.yaml", SHAPES_RUNS),
}


def run_one(method: Any, pretrained: bool, lr: float, epochs: int, runs_dir: str, name: str,
            pretrain_epochs: int | None = None, seed: int = 0, config: Path = CONFIG) -> dict[str, Any]:  # fmt: skip
    """Fit on the downstream split, then test once; returns accuracies and the trainable count."""
    from mmpeft.cli import run_cli  # noqa: PLC0415
    from mmpeft.core.report import parameter_report  # noqa: PLC0415

    args = [
        f"--config={config}", f"--seed_everything={seed}", f"--model.init_args.lr={lr}",
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
                   pretrain_epochs: int | None = None, task: str = "digits") -> dict[str, dict[str, Any]]:  # fmt: skip
    config, runs = QUICKSTARTS[task]
    results = {}
    for label in labels or list(runs):
        method, pretrained, lr = runs[label]
        start = time.perf_counter()
        results[label] = run_one(method, pretrained, lr, epochs, runs_dir, label.replace(" ", "_").replace(",", ""),
                                 pretrain_epochs, config=config)  # fmt: skip
        results[label]["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=sorted(QUICKSTARTS), default="digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs-dir", default=None, help="default: runs/transfer (digits), runs/transfer_shapes")
    args = parser.parse_args()
    runs_dir = args.runs_dir or ("runs/transfer" if args.task == "digits" else f"runs/transfer_{args.task}")
    results = transfer_table(args.epochs, runs_dir, task=args.task)
    print("| run | test acc | val acc | trainable | seconds |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['test_acc']:.3f} | {r['val_acc']:.3f} | {r['trainable']:,} | {r['seconds']} |")


if __name__ == "__main__":
    main()
