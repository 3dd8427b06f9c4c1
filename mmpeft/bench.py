"""`mmpeft bench`: per method, in its own process, the median training-step time after warm-up, the
peak memory above the process's post-build baseline, and the trainable count, next to full
fine-tuning and the *floor*: the same backbone whose only trainable tensor is added right after
the embedding (token backbones) or the first layer (`conv_in` of a UNet, the patch projection of a
DiT, a convnet's stem), so backward reaches the whole network but computes no weight gradients.
Ratios to the floor show what a method itself costs. The backbone supplies the batch and the loss
(images and cross-entropy; noisy latents, timesteps, conditioning and the noise-prediction MSE).
Results go to CSV and markdown under `--out` (default `runs/bench/`, ignored by git); an existing result
file is never replaced without `--overwrite`. Method names are checked before any worker starts. A method
that is not supported on the backbone keeps its row (with the reason); one that fails in its worker for
any other reason gets a `failed: ...` row, and the command exits 1 once the other rows are written.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import MmpeftError, NotSupported, OutputExists
from mmpeft.core.inject import attach
from mmpeft.core.method import Method, get_method, list_methods
from mmpeft.core.modules import AdapterModule
from mmpeft.core.report import markdown_table

__all__ = ["add_bench_arguments", "run_bench", "bench_methods", "Floor", "measure", "BenchFailed", "ResultsExist"]

DEFAULT_OUT = "runs/bench"  # not the committed experiments/bench (refresh: --out experiments/bench --overwrite)


class BenchFailed(MmpeftError, RuntimeError):
    """The floor could not be measured, so there is nothing to compare against and nothing is written."""


class ResultsExist(OutputExists):
    """The result file for this backbone, input, batch, device and precision exists and --overwrite was not given."""


class _ShiftAfterEmbedding(AdapterModule):
    def __init__(self, dim: int, device=None):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        return x + self.shift


class _ShiftAfterLayer(AdapterModule):
    def __init__(self, dim: int, channel_dim: int, device=None):
        super().__init__()
        self.channel_dim = channel_dim
        self.shift = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y + self.shift.view(shape)


@dataclass
class Floor(Method):
    """The benchmark floor: one trainable vector on the input side, nothing else — added to the
    tokens before block 0 of a token backbone, or after the first layer of any other backbone."""

    name: ClassVar[str] = "floor"
    mergeable: ClassVar[bool] = False

    def inject(self, backbone: nn.Module) -> None:
        device = next(backbone.parameters()).device
        if isinstance(backbone, TokenBackbone):
            backbone.before_block[0].append(_ShiftAfterEmbedding(backbone.embed_dim, device))
            return
        layer = backbone.get_submodule(backbone.input_layer())
        if isinstance(layer, nn.Linear):
            width, channel_dim = layer.out_features, -1
        elif isinstance(layer, nn.Embedding):
            width, channel_dim = layer.embedding_dim, -1
        else:
            width, channel_dim = layer.out_channels, 1
        attach(layer, "floor", _ShiftAfterLayer(width, channel_dim, device))


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="vit_base_patch16_224", help="mmpeft or timm backbone name")
    p.add_argument("--img-size", type=int, default=224, help="image size of timm backbones (others bring theirs)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (floor is always added)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="32", help="32 | bf16 (autocast on CUDA)")
    p.add_argument("--memory", action="store_true", help="also attribute the tensors saved for backward to modules "
                   "and method pieces (<stem>-memory.md)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for the CSV and markdown tables ({DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result file (otherwise refused)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(args: argparse.Namespace, method_name: str) -> dict:
    """One method's numbers, measured in this process (the worker side)."""
    from mmpeft.core.model import PeftModel  # noqa: PLC0415
    from mmpeft.core.report import parameter_report  # noqa: PLC0415
    from mmpeft.tasks.callbacks import PeakMemory  # noqa: PLC0415
    from mmpeft.tasks.step import optimizer_step, step_loss  # noqa: PLC0415

    torch.manual_seed(0)
    device = _device(args.device)
    backbone = bench_backbone(args)
    method = Floor() if method_name == "floor" else method_name
    classes = args.num_classes if backbone.num_features else None
    model = PeftModel(backbone, method, num_classes=classes).to(device)
    if method_name == "floor":
        model.head.requires_grad_(False)
    model.train()
    x, y = backbone.example_batch(args.batch, torch.Generator().manual_seed(0), classes)
    x = x.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16" and device.type == "cuda")
    memory = PeakMemory(device)
    memory.start()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:  # the method's whole step: MoSA runs two passes plus its consistency term
            loss = step_loss(model, x, y, backbone.example_loss).loss
        optimizer_step(loss, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(1000 * (time.perf_counter() - start))
    peak = memory.stop()
    breakdown = _breakdown(model, x, y, backbone.example_loss, method_name) if getattr(args, "memory", False) else None
    report = parameter_report(model)
    shown = x.x if isinstance(x, BackboneInput) else x
    return {
        **({"breakdown": breakdown} if breakdown else {}),
        "method": method_name,
        "input": "x".join(str(d) for d in shown.shape[1:]),
        "trainable": report.trainable,
        "step_ms": round(statistics.median(times), 2),
        "peak_mem_mb": round(peak / 2**20, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
    }


def bench_backbone(args: argparse.Namespace) -> nn.Module:
    """The backbone to time: registered and prefixed names bring their own input size; timm names take
    `--img-size` / `--in-chans`. mmpeft's quickstart backbones (digits, shapes) skip their pretraining: speed
    does not depend on the weights."""
    from mmpeft.backbones import BACKBONES, create_backbone  # noqa: PLC0415
    from mmpeft.backbones.weights import WEIGHTS_BUILDERS  # noqa: PLC0415

    if args.backbone in WEIGHTS_BUILDERS:
        return create_backbone(args.backbone, pretrained=False)
    if args.backbone in BACKBONES or ":" in args.backbone:
        return create_backbone(args.backbone)
    extra = {"in_chans": args.in_chans} if args.in_chans != 3 else {}
    return create_backbone(args.backbone, img_size=args.img_size, **extra)


def _breakdown(model: nn.Module, x, y, loss_fn, method_name: str) -> str:
    """The saved-for-backward table of one training step (`mmpeft.memory`), step_loss's way (MoSA's two passes)."""
    from mmpeft.memory import breakdown_markdown, saved_tensors  # noqa: PLC0415
    from mmpeft.tasks.step import step_loss  # noqa: PLC0415

    model.zero_grad(set_to_none=True)
    saved = saved_tensors(
        model, x, y, lambda loss, _: loss, forward=lambda m, inputs: step_loss(m, inputs, y, loss_fn).loss
    )
    return breakdown_markdown(method_name, saved)


def worker_row(args: argparse.Namespace, method: str) -> dict:
    """The worker's answer: the measured row, or, when the method is not supported on this backbone, a row
    with the reason (information, not a failure). Any other error propagates: the worker exits non-zero."""
    try:
        return measure(args, method)
    except NotSupported as err:
        return {"method": method, "error": str(err).split(";")[0]}


def _run_worker(args: argparse.Namespace, method: str) -> dict:
    """One method in its own process. A worker that exits non-zero (any error but NotSupported, or killed)
    gives a row marked `failed` whose error is the last stderr line, with the exception's class."""
    cmd = [sys.executable, "-m", "mmpeft.bench", "--worker", method]
    for key in ("backbone", "img_size", "in_chans", "batch", "steps", "warmup", "num_classes", "device", "precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if getattr(args, "memory", False):
        cmd.append("--memory")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    errors = done.stderr.strip().splitlines()
    last = errors[-1].strip() if errors else f"worker exited with status {done.returncode}"
    return {"method": method, "error": f"failed: {last[:200]}", "failed": True}


def bench_methods(spec: str) -> list[str]:
    """The methods to time, floor first: 'all' or comma-separated names, each checked (UnknownName with
    close matches) before any worker starts."""
    names = list_methods() if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    return ["floor", *dict.fromkeys(get_method(m).name for m in names if m.lower() != "floor")]


def _size(shape: str) -> str:
    dims = shape.split("x")
    return f"{dims[-1]}px" if len(dims) == 3 and dims[-1] == dims[-2] else shape  # images and latents: "224px"


def result_stem(args: argparse.Namespace, floor: dict) -> str:
    """`<backbone>-<size>-b<batch>-<device>-<precision>`, from the floor's measured input and device."""
    safe = args.backbone.replace(":", "_").replace("/", "_")  # portable file names
    return f"{safe}-{_size(floor['input'])}-b{args.batch}-{floor['device'].replace(' ', '_')}-{args.precision}"


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Times the floor, then each method; writes `<out>/<stem>.csv` and `.md` and returns the rows (failed
    ones carry `failed: True`). Raises UnknownName for a bad method name before anything runs, BenchFailed
    when the floor does not run, and ResultsExist, right after the floor, when the result file is there
    already and `args.overwrite` is not set (nothing is written then)."""
    methods = bench_methods(args.methods)
    print("bench: floor ...", file=sys.stderr, flush=True)
    floor = _run_worker(args, "floor")
    if "error" in floor:
        reason = floor["error"].removeprefix("failed: ")
        raise BenchFailed(f"the floor did not run on {args.backbone!r}; nothing was timed or written: {reason}")
    out = Path(args.out)
    stem = result_stem(args, floor)
    paths = (out / f"{stem}.csv", out / f"{stem}.md")
    extra = (out / f"{stem}-memory.md",) if getattr(args, "memory", False) else ()
    existing = [str(path) for path in paths + extra if path.exists()]
    if existing and not getattr(args, "overwrite", False):
        raise ResultsExist(
            f"bench results already exist: {', '.join(existing)}; pass --overwrite to replace them, or --out DIR "
            "to write elsewhere (nothing was written)"
        )
    rows = [floor]
    for method in methods[1:]:
        print(f"bench: {method} ...", file=sys.stderr, flush=True)
        rows.append(_run_worker(args, method))
    for r in rows:
        if "error" not in r:
            r["time_vs_floor"] = round(r["step_ms"] / floor["step_ms"], 2)
            r["mem_vs_floor"] = round(r["peak_mem_mb"] / max(floor["peak_mem_mb"], 1e-9), 2)
    out.mkdir(parents=True, exist_ok=True)
    device, shape, size = floor["device"].replace(" ", "_"), floor["input"], _size(floor["input"])
    columns = ["method", "trainable", "step_ms", "time_vs_floor", "peak_mem_mb", "mem_vs_floor", "device", "error"]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"# mmpeft bench: {args.backbone}, {size} (input {shape}), batch {args.batch}, {device}, precision "
        f"{args.precision}\n\nMedian of {args.steps} training steps after {args.warmup} warm-up steps (AdamW); "
        "peak memory above the post-build baseline; ratios against the floor.\n\n"
    )
    table = markdown_table([{c: r.get(c, "") for c in columns if any(c in x for x in rows)} for r in rows])
    paths[1].write_text(header + table + "\n")
    print(header + table)
    print(f"bench: wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if getattr(args, "memory", False):
        memory = extra[0]
        intro = ("Tensors saved for backward in one training step, by the module running when each was saved "
                 "(each storage once; parameters excluded; block indices folded). `mmpeft.memory`.\n\n")  # fmt: skip
        memory.write_text(header.replace("# mmpeft bench:", "# mmpeft bench --memory:", 1) + intro
                          + "\n".join(r["breakdown"] for r in rows if "breakdown" in r))  # fmt: skip
        print(f"bench: wrote {memory}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mmpeft.bench")
    add_bench_arguments(parser)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker_row(ns, ns.worker)))
    else:  # the same checks and exit codes as `mmpeft bench`
        from mmpeft.cli import main  # noqa: PLC0415

        sys.exit(main(["bench", *sys.argv[1:]]))
