"""What EfficientDM's integer export buys on CPU: file size and denoiser forward time, per precision.

    python -m mmpeft.lab.int_bench --out experiments/efficientdm/export.md

For a mid-size DiT (random weights; big enough that a forward is tens of milliseconds) and the digits DiT, at
W8A8, W4A8 and W4A4: the integer export's file size against the fp32 and bf16 denoiser safetensors, and the
forward time (median, min..max over `--rounds` after two warm-up calls, `--threads` threads) of the fp32 and bf16
denoisers, the fake-quantized QALoRA model, and the export loaded in "dequantize" and "int" mode. The activation
tables come from `stand_in_state` (a unit-normal calibration): the bench measures cost, not quality.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mmpeft.core.context import BackboneInput
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules
from mmpeft.interop.int_export import IntLayer, export_int, int_mm_works, load_int_model

__all__ = ["MID_DIT", "CONFIGS", "main"]

# 8 blocks of 8 heads x 64 on 16x16x4 latents, patch 2 (64 tokens): 38M parameters
MID_DIT = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 8,
    "num_attention_heads": 8,
    "attention_head_dim": 64,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
CONFIGS = ((8, 8), (4, 8), (4, 4))


def _mid_dit() -> nn.Module:
    from mmpeft.backbones.dit import DiffusersDiT

    return DiffusersDiT(config=dict(MID_DIT), name="mid_dit", example_size=16)


def _digits_dit() -> nn.Module:
    from mmpeft.backbones.digits_dit import DigitsDiT

    return DigitsDiT(pretrained=False)


DENOISERS: dict[str, Callable[[], nn.Module]] = {"mid_dit": _mid_dit, "digits_dit": _digits_dit}


@torch.no_grad()
def time_forward(model: nn.Module, inputs: BackboneInput, rounds: int) -> list[float]:
    """Seconds per forward over `rounds` calls, after two warm-up calls."""
    for _ in range(2):
        model(inputs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return times


def _file_size(state: dict[str, torch.Tensor], folder: Path, name: str) -> int:
    path = folder / name
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path.stat().st_size


def _cast(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def _inputs(backbone: nn.Module, batch: int, dtype: torch.dtype = torch.float32) -> BackboneInput:
    x = backbone.example_batch(batch, torch.Generator().manual_seed(0), None)[0]
    return BackboneInput(x.x.to(dtype), x.timestep, x.cond, step=0)


def _row(label: str, size: int | None, fp32_size: int, times: list[float] | None) -> dict:
    return {"variant": label, "size": size, "ratio": size / fp32_size if size else None, "times": times}


def bench_denoiser(name: str, batch: int, rounds: int, folder: Path) -> list[dict]:
    """The rows of one denoiser: fp32, bf16, then per config the fake-quant model and the export's two modes."""
    build = DENOISERS[name]
    backbone = build().eval()
    fp32 = _file_size(backbone.state_dict(), folder, f"{name}-fp32.safetensors")
    bf16 = _file_size(_cast(backbone, torch.bfloat16), folder, f"{name}-bf16.safetensors")
    inputs = _inputs(backbone, batch)
    rows = [_row("fp32", fp32, fp32, time_forward(backbone, inputs, rounds))]
    half = copy.deepcopy(backbone).to(torch.bfloat16)
    rows.append(_row("bf16", bf16, fp32, time_forward(half, _inputs(half, batch, torch.bfloat16), rounds)))
    del half
    for w_bits, a_bits in CONFIGS:
        tag = f"W{w_bits}A{a_bits}"
        model = PeftModel(build(), {"name": "efficientdm", "w_bits": w_bits, "a_bits": a_bits}).eval()
        model.method.stand_in_state(model.backbone)
        rows.append(_row(f"{tag} fake-quant QALoRA", None, fp32, time_forward(model, inputs, rounds)))
        path = export_int(model, folder / f"{name}-{tag}.safetensors")
        del model
        size = path.stat().st_size
        for mode in ("dequantize", "int"):
            if mode == "int" and not int_mm_works():
                rows.append(_row(f"{tag} int export, int (torch._int_mm unavailable)", size, fp32, None))
                continue
            loaded = load_int_model(path, build(), mode=mode)
            n_int = sum(isinstance(p, IntLayer) and p.int_path for _, p in adapter_modules(loaded.backbone))
            label = f"{tag} int export, {mode}" + (f" ({n_int} linears in int8)" if mode == "int" else "")
            rows.append(_row(label, size, fp32, time_forward(loaded, inputs, rounds)))
            del loaded
    return rows


def _ms(times: list[float] | None) -> str:
    if not times:
        return "n/a"
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}..{max(ms):.1f})"


def markdown(results: dict[str, list[dict]], header: list[str]) -> str:
    lines = ["# EfficientDM integer export: file size and CPU forward time", "", *header, ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| variant | file (MB) | vs fp32 | forward ms, median (min..max) |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            size = f"{r['size'] / 2**20:.2f}" if r["size"] else "n/a (adapter + fp32 backbone)"
            ratio = f"{r['ratio']:.3f}" if r["ratio"] else ""
            lines.append(f"| {r['variant']} | {size} | {ratio} | {_ms(r['times'])} |")
        lines.append("")
    return "\n".join(lines)


def _params(build: Callable[[], nn.Module]) -> int:
    return sum(p.numel() for p in build().parameters())


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/efficientdm/export.md", help="the markdown file to write")
    p.add_argument("--rounds", type=int, default=5, help="timed forwards per variant (after two warm-up calls)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--batch", type=int, default=4, help="samples per forward")
    p.add_argument("--denoisers", nargs="+", default=list(DENOISERS), choices=list(DENOISERS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), _load()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.denoisers:
            results[f"{name} ({_params(DENOISERS[name]) / 1e6:.1f}M parameters, batch {args.batch})"] = bench_denoiser(
                name, args.batch, args.rounds, Path(tmp)
            )
    header = [
        f"- command: `python -m mmpeft.lab.int_bench {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; int path: torch._int_mm {'available' if int_mm_works() else 'absent'}",
        f"- date {datetime.datetime.now().isoformat(timespec='seconds')}; bench wall time "
        f"{time.perf_counter() - start:.0f} s; 1-min load average {load_before:.2f} before, {_load():.2f} after (other "
        "processes on these cores inflate the times)",
        "- weights random, activation tables from a unit-normal stand-in calibration (cost, not quality); "
        "fake-quant QALoRA: the training-time model (rank 32), which re-quantizes W + BA every forward; "
        "int export `dequantize`: float32 weights computed once at load; `int`: linears through int8 x int8 -> "
        "int32 `torch._int_mm`, convolutions (the patch embedding) dequantized",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, header))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
