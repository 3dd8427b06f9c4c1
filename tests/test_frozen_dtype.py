"""`frozen_dtype: bfloat16` from the command line: a run under bf16 autocast with the frozen matmul weights stored
in bf16, whose adapter an fp32 run evaluates; the wrong precision and full fine-tuning are refused with the fix.
(The contracts on every method and backbone family are in `test_conformance.py`.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmpeft.cli import main, run_cli
from mmpeft.core.precision import cast_frozen, frozen_dtype_of

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["-c", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone.init_args.pretrained=false",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--run.wandb=disabled",
         "--trainer.enable_model_summary=false"]  # fmt: skip
BF16 = ["--model.init_args.frozen_dtype=bfloat16", "--trainer.precision=bf16-mixed"]


def test_a_bf16_frozen_run_trains_and_an_fp32_run_evaluates_its_adapter(tmp_path):
    assert main(["fit", *SMALL, *BF16, f"--run.dir={tmp_path}", "--run.name=bf16"]) == 0
    summary = json.loads(next(tmp_path.glob("bf16/version_0/summary.json")).read_text())
    assert summary["metrics"]["val/acc"] is not None
    adapter = tmp_path / "bf16" / "version_0" / "adapter.safetensors"
    assert main(["test", *SMALL, f"--adapter={adapter}", f"--run.dir={tmp_path}", "--run.name=fp32"]) == 0
    built = run_cli([*SMALL, *BF16, f"--run.dir={tmp_path}"], run=False).model.model
    assert frozen_dtype_of(built.backbone) == torch.bfloat16 and built.head.weight.dtype == torch.float32


def test_the_wrong_precision_and_full_fine_tuning_are_refused_with_the_fix(tmp_path, capsys):
    assert main(["fit", *SMALL, "--model.init_args.frozen_dtype=bfloat16", f"--run.dir={tmp_path}"]) == 2
    assert "set --trainer.precision bf16-mixed (got 32" in capsys.readouterr().err
    full = ["--model.init_args.method=full"]
    assert main(["fit", *SMALL, *BF16, *full, f"--run.dir={tmp_path}"]) == 2
    assert "trains the whole backbone" in capsys.readouterr().err


def test_only_frozen_matmul_weights_are_cast():
    layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    layers[2].requires_grad_(True)
    for tensor in [*layers[0].parameters(), *layers[1].parameters()]:
        tensor.requires_grad_(False)
    assert cast_frozen(layers, "bfloat16") == 4 * 4 + 4, "the frozen Linear only: not the norm, not the trained one"
    assert layers[0].weight.dtype == torch.bfloat16 and layers[1].weight.dtype == torch.float32
    assert layers[2].weight.dtype == torch.float32 and frozen_dtype_of(layers) == torch.bfloat16
