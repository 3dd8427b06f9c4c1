"""The in-process half of `mmpeft bench`: one row (a method, a variant or the floor) built and measured in
this process — training step time, peak memory, saved-for-backward bytes, inference with and without the
merge. `mmpeft.lab.bench` runs it once per row and round, each in a fresh process
(`python -m mmpeft.lab.bench_worker ROW ...`), and prints the measured row as one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmpeft.core.anatomy import ForwardContext, TokenBackbone
from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import attach
from mmpeft.core.method import Method
from mmpeft.core.modules import AdapterModule
from mmpeft.lab.bench_peers import PEERS, peer_layers, peer_model

__all__ = [
    "DEFAULT_OUT",
    "LIVE_MMAP_THRESHOLD",
    "row_method",
    "Floor",
    "add_bench_arguments",
    "measure",
    "worker_row",
    "bench_backbone",
    "CKPT",
    "VARIANTS",
]


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


DEFAULT_OUT = "runs/bench"  # not the committed experiments/bench (refresh: --out experiments/bench --overwrite)
LIVE_MMAP_THRESHOLD = 128 * 1024  # glibc's M_MMAP_THRESHOLD for --allocator live (its initial default, kept fixed)
CKPT = "+ckpt"  # row suffix: the method with activation checkpointing on

# labelled rows that are not plain method names: label -> method spec (None: a peer, built by its own library in
# `mmpeft.lab.bench_peers`: peft's LoRA on the fused qkv, diffusers' DreamBooth-LoRA step on a UNet)
VARIANTS: dict[str, dict | None] = {
    "lora_qkv": {"name": "lora", "r": 8, "targets": ["attn.qkv"]},  # mmpeft LoRA on the whole fused qkv
    **dict.fromkeys(PEERS),
    "vpt_deep": {"name": "vpt", "length": 10, "deep": True},  # 10 prompts per block
    "svfit_r8": {"name": "svfit", "r": 8},  # SVFit's top 8 singular values, beside LoRA r=8 on the same matrices
}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="vit_base_patch16_224", help="mmpeft or timm backbone name")
    p.add_argument("--img-size", type=int, default=224, help="image size of timm backbones (others bring theirs)")
    p.add_argument("--backbone-options", default="{}", help='JSON keyword arguments for a registered backbone, e.g. '
                   '\'{"num_points": 2048, "num_group": 128}\' (Point-MAE on ScanObjectNN)')  # fmt: skip
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", default="all", help="comma-separated method names or variants (lora_qkv, "
                   "peft_lora, vpt_deep), or 'all' (every method and variant; the floor always)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="times every row runs, each in a fresh process, interleaved")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--infer-steps", type=int, default=3, help="timed inference passes (0: skip inference)")
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="off", help="activation "
                   "checkpointing: off, on (every row), both (each row also as <method>+ckpt)")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "bf16-frozen"), help="32; bf16: autocast "
                   "to bfloat16 (CPU or CUDA), trainable tensors and optimizer state fp32; bf16-frozen: the same "
                   "with the frozen matmul weights stored in bf16 (frozen_dtype)")  # fmt: skip
    p.add_argument("--allocator", choices=("default", "live"), default="default", help="CPU only. default: the "
                   "C allocator as it is (peak RSS includes heap blocks it keeps after freeing); live: every block "
                   f"of {LIVE_MMAP_THRESHOLD // 1024} KiB or more its own mapping, returned when freed, so the peak "
                   "is the live tensors' (slower: compare its times only with each other)")  # fmt: skip
    p.add_argument("--memory", action="store_true", help="also attribute the tensors saved for backward to modules "
                   "and method pieces (<stem>-memory.md)")  # fmt: skip
    p.add_argument("--wandb", default="offline", help="log every row as a W&B run grouped by the result stem: "
                   "offline (default), online or disabled (WANDB_MODE overrides)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for the CSV and markdown tables ({DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result file (otherwise refused)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def row_method(row: str) -> tuple[str, bool]:
    """'lora+ckpt' -> ('lora', True)."""
    return (row[: -len(CKPT)], True) if row.endswith(CKPT) else (row, False)


def _build(args: argparse.Namespace, row: str, device: torch.device):
    from mmpeft.core.model import PeftModel

    name, checkpointing = row_method(row)
    checkpointing = checkpointing or args.checkpointing == "on"
    backbone = bench_backbone(args)
    classes = args.num_classes if backbone.num_features else None
    if name in PEERS:
        model = peer_model(name, backbone, classes)
    else:
        spec = VARIANTS.get(name, name)
        model = PeftModel(backbone, Floor() if name == "floor" else spec, num_classes=classes)
        model.method.stand_in_state(backbone)  # e.g. Point-PEFT's memory bank, at its real size
        if name == "floor":
            model.head.requires_grad_(False)
    if checkpointing:
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise NotSupported(f"{type(backbone).__name__} has no activation checkpointing")
        backbone.set_grad_checkpointing(True)
    return model.to(device), backbone, classes


def _median_ms(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def measure(args: argparse.Namespace, row: str) -> dict:
    """One row's numbers, measured in this process (the worker side)."""
    from mmpeft.core.process_memory import ProcessPeak
    from mmpeft.tasks.step import optimizer_step, step_loss

    torch.manual_seed(0)
    device = _device(args.device)
    model, backbone, classes = _build(args, row, device)
    if args.precision == "bf16-frozen":  # full fine-tuning refuses: its row records why
        if hasattr(model, "cast_frozen"):
            model.cast_frozen("bfloat16")
        else:  # the peft peer: its frozen base layers in bf16, as peft users load the base model
            from mmpeft.core.precision import cast_frozen

            cast_frozen(model, "bfloat16")
    model.train()
    x, y = backbone.example_batch(args.batch, torch.Generator().manual_seed(0), classes)
    x = x.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision != "32")
    if hasattr(model, "update"):  # a peer with its own step (diffusers' DreamBooth-LoRA loop)
        loss_of, update = model.loss, model.update
    else:  # the method's whole step: MoSA runs two passes plus its consistency term
        loss_of, update = (lambda inputs, targets: step_loss(model, inputs, targets, backbone.example_loss).loss,
                           optimizer_step)  # fmt: skip

    def train_step() -> None:
        with autocast:
            loss = loss_of(x, y)
        update(loss, optimizer)

    peak = ProcessPeak(device)
    peak.start()
    times = _median_ms(train_step, args.warmup, args.steps, device)
    peak_bytes = peak.stop()
    result = {"method": row, "input": "x".join(str(d) for d in (x.x if isinstance(x, BackboneInput) else x).shape[1:]),
              "trainable": _trainable(model), "step_ms": round(statistics.median(times), 2),
              "peak_mem_mb": round(peak_bytes / 2**20, 1), "peak_kind": peak.kind,
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)}  # fmt: skip
    saved = _saved(model, x, y, loss_of, autocast)
    result["saved_mb"] = round(saved.total / 2**20, 1)
    if getattr(args, "memory", False):
        from mmpeft.lab.memory import breakdown_markdown

        result["breakdown"] = breakdown_markdown(row, saved)
    if args.infer_steps > 0:
        result.update(_inference(model, x, args, device, autocast, plain=row == "floor"))
    return result


def _trainable(model: nn.Module) -> int:
    from mmpeft.core.model import PeftModel
    from mmpeft.core.report import parameter_report

    if isinstance(model, PeftModel):
        return parameter_report(model).trainable
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # a peer built outside mmpeft


def _saved(model, x, y, loss_of, autocast):
    """What autograd saves for backward in one training step (`mmpeft.lab.memory.saved_tensors`)."""
    from mmpeft.lab.memory import saved_tensors

    def forward(m, inputs):
        with autocast:
            return loss_of(inputs, y)

    model.zero_grad(set_to_none=True)
    saved = saved_tensors(model, x, y, lambda loss, _: loss, forward=forward)
    model.zero_grad(set_to_none=True)
    return saved


def _inference(model, x, args, device, autocast, plain: bool) -> dict:
    """Median eval forward as trained; `plain`: the bare backbone (the floor's piece switched off). For a
    method that merges, merged and bare-backbone passes alternate in this process (unmerge, `disabled`, merge
    again between timed passes), so `merged_vs_plain` compares the two on the same heap and cache state: the
    median of the per-pass ratios."""
    from mmpeft.core.pristine import disabled

    model.eval()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(x)

    if plain:
        with disabled(model.backbone):
            return {"infer_ms": round(statistics.median(_median_ms(forward, 1, args.infer_steps, device)), 2)}
    out = {"infer_ms": round(statistics.median(_median_ms(forward, 1, args.infer_steps, device)), 2)}
    if getattr(getattr(model, "method", None), "trains_backbone", False) or not _merge(model, True):
        return out  # full fine-tuning has no frozen backbone to compare with, and nothing to merge
    merged, bare = [], []
    for _ in range(args.infer_steps + 1):  # the first pair warms up
        merged += _median_ms(forward, 0, 1, device)
        _merge(model, False)
        with disabled(model.backbone), _peers_off(model):
            bare += _median_ms(forward, 0, 1, device)
        _merge(model, True)
    merged, bare = merged[1:], bare[1:]
    out["infer_merged_ms"] = round(statistics.median(merged), 2)
    out["infer_plain_ms"] = round(statistics.median(bare), 2)
    out["merged_vs_plain"] = round(statistics.median(m / b for m, b in zip(merged, bare)), 4)
    return out


def _merge(model: nn.Module, merge: bool) -> bool:
    """Merge (or unmerge) for inference: mmpeft's `merge()`, and peft's own layer merge for the peer row;
    False when nothing merges (the method is not mergeable)."""
    peft_layers = peer_layers(model)
    for layer in peft_layers:
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
    if peft_layers:
        return True
    method = getattr(model, "method", None)
    if method is None or not getattr(method, "mergeable", False) or not method.can_merge(model.backbone):
        return False  # e.g. SSF on a bias-free qkv (Point-MAE): the trained model is what inference runs
    model.merge() if merge else model.unmerge()
    return True


@contextlib.contextmanager
def _peers_off(model: nn.Module):
    """peft's layers switched off (unmerged ones still add their update otherwise): the bare-backbone pass."""
    layers = peer_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def bench_backbone(args: argparse.Namespace) -> nn.Module:
    """The backbone to time: registered and prefixed names bring their own input size; timm names take
    `--img-size` / `--in-chans`. mmpeft's quickstart backbones (digits, shapes) skip their pretraining: speed
    does not depend on the weights."""
    from mmpeft.backbones import create_backbone
    from mmpeft.backbones.registry import create_without_pretraining, registered_names

    if args.backbone in registered_names() or ":" in args.backbone:
        options = json.loads(getattr(args, "backbone_options", "{}") or "{}")
        if not isinstance(options, dict):
            raise ValueError(f"--backbone-options takes a JSON object, got {args.backbone_options!r}")
        return create_without_pretraining(args.backbone, **options)
    extra = {"in_chans": args.in_chans} if args.in_chans != 3 else {}
    return create_backbone(args.backbone, img_size=args.img_size, **extra)


def worker_row(args: argparse.Namespace, method: str) -> dict:
    """The worker's answer: the measured row, or, when the method is not supported on this backbone, a row
    with the reason (information, not a failure). Any other error propagates: the worker exits non-zero."""
    try:
        return measure(args, method)
    except NotSupported as err:
        return {"method": method, "error": str(err).split(";")[0]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mmpeft.lab.bench_worker")
    add_bench_arguments(parser)
    ns = parser.parse_args()
    if not ns.worker:
        parser.error("the worker measures one row: --worker ROW (the whole bench is `mmpeft bench`)")
    print(json.dumps(worker_row(ns, ns.worker)))
