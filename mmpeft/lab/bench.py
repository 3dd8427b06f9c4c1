"""`mmpeft bench`: what each method costs a training step and an inference pass, against the same backbone.

Protocol (one result file per backbone, input, batch, device and precision):
- Rounds: `--rounds N` times, every row runs once, each in its own fresh process, in an order rotated by one
  per round, so drift of the machine (thermals, other load) is spread over every row instead of biasing the
  ones that ran last. A row is a method, a labelled variant (`lora_qkv`, `peft_lora`) or a method with
  activation checkpointing (`<method>+ckpt`, `--checkpointing both`).
- Time: in each process, `--warmup` untimed steps, then the median of `--steps` timed training steps (AdamW).
  Reported: the median over rounds with its min..max, and the ratio to the floor taken per round (paired:
  both ran in the same round) and summarised the same way.
- Memory: the process's own peak above its post-build baseline (`mmpeft.core.process_memory.ProcessPeak`: the kernel's
  resident-set high-water mark, reset after the build through /proc/self/clear_refs; CUDA's allocator peak on
  a GPU); no sampling thread. Also the bytes autograd saves for backward in one step (`saved_mb`, the
  allocator-independent part of it; `--memory` writes the per-module breakdown).
- Inference: the median eval-mode forward of the model as trained (`infer_ms`) and, for mergeable methods,
  after `merge()` (`infer_merged_ms`), against the plain backbone's (the floor row's `infer_ms`, with its piece
  off).
- The *floor*: the same backbone whose only trainable tensor is added right after the embedding (token
  backbones) or the first layer (`conv_in` of a UNet, the patch projection of a DiT, a convnet's stem), so
  backward reaches the whole network but computes no weight gradients. Ratios to the floor show what a
  method itself costs.
- Variants: `vpt_deep` (10 prompts per block; `vpt` is shallow); `svfit_r8` (SVFit's top 8 singular values,
  beside `lora`'s rank 8 on the same matrices; `svfit` is the full spectrum). Peers (`mmpeft.lab.bench_peers`):
  `peft_lora` is Hugging Face peft's LoRA (r = 8, alpha = 8) on the fused `attn.qkv`, and `lora_qkv` mmpeft's
  LoRA on the same linear with the same rank (peft cannot target the q, v thirds); `lora` is mmpeft's default
  (q and v thirds). `diffusers_lora` is diffusers' DreamBooth-LoRA training step on a UNet (peft's LoRA through
  `unet.add_adapter`, at mmpeft's LoRA rank and targets), beside mmpeft's `lora` row.
- Precision `32` or `bf16` (autocast to bfloat16 on CPU or CUDA; trainable tensors and AdamW state stay fp32), or
  `bf16-frozen` (the same, with the frozen matmul weights stored in bf16: `frozen_dtype`, `mmpeft.core.precision`).
- Allocator (CPU): glibc keeps freed heap blocks, so a CPU peak RSS holds the live tensors plus whatever the
  order of a method's allocations left fragmented (it varies by method and run). `--allocator live` runs the
  workers with a fixed 128 KiB mmap threshold, so the peak is that of live tensors (what CUDA's allocator peak
  measures on a GPU); result names end in `-live`.

Results go to CSV and markdown under `--out` (default `runs/bench/`, ignored by git), the markdown headed by
the exact command, versions and machine; an existing result file is never replaced without `--overwrite`.
Method names are checked before any worker starts. A row not supported on the backbone keeps its line (with
the reason); one that fails in its worker for any other reason gets a `failed: ...` row, and the command
exits 1 once the other rows are written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from mmpeft.core.errors import MmpeftError, OutputExists
from mmpeft.core.method import get_method, list_methods
from mmpeft.lab import records
from mmpeft.lab.bench_worker import (
    CKPT,
    LIVE_MMAP_THRESHOLD,
    VARIANTS,
    Floor,
    add_bench_arguments,
    measure,
    row_method,
)

__all__ = ["add_bench_arguments", "run_bench", "bench_methods", "Floor", "measure", "BenchFailed", "ResultsExist"]


class BenchFailed(MmpeftError, RuntimeError):
    """The floor could not be measured, so there is nothing to compare against and nothing is written."""


class ResultsExist(OutputExists):
    """The result file for this backbone, input, batch, device and precision exists and --overwrite was not given."""


WORKER_OPTIONS = ("backbone", "backbone_options", "img_size", "in_chans", "batch", "steps", "warmup", "infer_steps",
                  "checkpointing", "num_classes", "device", "precision")  # fmt: skip


def _run_worker(args: argparse.Namespace, method: str) -> dict:
    """One row in its own process. A worker that exits non-zero (any error but NotSupported, or killed)
    gives a row marked `failed` whose error is the last stderr line, with the exception's class."""
    cmd = [sys.executable, "-m", "mmpeft.lab.bench_worker", "--worker", method]
    for key in WORKER_OPTIONS:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if getattr(args, "memory", False):
        cmd.append("--memory")
    env = dict(os.environ)
    if getattr(args, "allocator", "default") == "live":  # a fixed threshold also stops glibc from raising it
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    errors = done.stderr.strip().splitlines()
    last = errors[-1].strip() if errors else f"worker exited with status {done.returncode}"
    return {"method": method, "error": f"failed: {last[:200]}", "failed": True}


def bench_methods(spec: str, checkpointing: str = "off") -> list[str]:
    """The rows to run, floor first: 'all' (every method and the peer variants) or comma-separated method
    names / variants, each checked (UnknownName with close matches) before any worker starts; with
    checkpointing 'both', each row also as '<row>+ckpt' (the linear probe has no backward through the backbone)."""
    if spec.strip() == "all":
        rows = [*list_methods(), *VARIANTS]
    else:
        rows = []
        for m in (m.strip() for m in spec.split(",") if m.strip()):
            base, _ = row_method(m)
            rows.append(base if base in VARIANTS else get_method(base).name)
    rows = ["floor", *dict.fromkeys(r for r in rows if r.lower() != "floor")]
    if checkpointing == "both":
        rows += [r + CKPT for r in rows if r != "linear"]
    return rows


def _size(shape: str) -> str:
    dims = shape.split("x")
    return f"{dims[-1]}px" if len(dims) == 3 and dims[-1] == dims[-2] else shape  # images and latents: "224px"


def result_stem(args: argparse.Namespace, floor: dict) -> str:
    """`<backbone>-<size>-b<batch>-<device>-<precision>[-ckpt|-ckpt-both]`, from the floor's measured input and
    device."""
    safe = args.backbone.replace(":", "_").replace("/", "_")  # portable file names
    ckpt = {"on": "-ckpt", "both": "-ckpt-both"}.get(getattr(args, "checkpointing", "off"), "")
    ckpt += "-live" if getattr(args, "allocator", "default") == "live" else ""
    return f"{safe}-{_size(floor['input'])}-b{args.batch}-{floor['device'].replace(' ', '_')}-{args.precision}{ckpt}"


def _spread(values: list[float], digits: int = 2) -> tuple[float, float, float]:
    return round(statistics.median(values), digits), round(min(values), digits), round(max(values), digits)


def summarize(rounds: list[dict[str, dict]], order: list[str]) -> list[dict]:
    """One row per method over the rounds: median and min..max of step time, peak memory and inference, and
    the per-round (paired) ratios to the floor, summarised the same way."""
    rows = []
    for name in order:
        measured = [r[name] for r in rounds if name in r]
        ok = [m for m in measured if "error" not in m]
        failed = [m for m in measured if m.get("failed")]
        if failed or not ok:  # a failure in any round is reported; "not supported" is the same every round
            rows.append(dict(failed[0] if failed else measured[-1]))
            continue
        row = {k: ok[-1][k] for k in ("method", "input", "trainable", "device", "peak_kind", "saved_mb") if k in ok[-1]}
        for key, out in (("step_ms", "step_ms"), ("peak_mem_mb", "peak_mem_mb"), ("infer_ms", "infer_ms"),
                         ("infer_merged_ms", "infer_merged_ms")):  # fmt: skip
            values = [m[key] for m in ok if key in m]
            if values:
                row[out], row[f"{out}_min"], row[f"{out}_max"] = _spread(values, 1 if key == "peak_mem_mb" else 2)
        for key, ratio, ref in (("step_ms", "time_vs_floor", "step_ms"),
                                ("peak_mem_mb", "mem_vs_floor", "peak_mem_mb")):  # fmt: skip
            paired = [r[name][key] / r["floor"][ref] for r in rounds
                      if key in r.get(name, {}) and ref in r.get("floor", {}) and r["floor"][ref] > 0]  # fmt: skip
            if paired:
                row[ratio], row[f"{ratio}_min"], row[f"{ratio}_max"] = _spread(paired)
        in_process = [m["merged_vs_plain"] for m in ok if "merged_vs_plain" in m]  # paired inside each worker
        if in_process:
            row["merged_vs_plain"], row["merged_vs_plain_min"], row["merged_vs_plain_max"] = _spread(in_process)
        row["rounds"] = len(ok)
        rows.append(row)
    return rows


COLUMNS = ["method", "trainable", "step_ms", "step_ms_min", "step_ms_max", "time_vs_floor", "time_vs_floor_min",
           "time_vs_floor_max", "peak_mem_mb", "peak_mem_mb_min", "peak_mem_mb_max", "mem_vs_floor",
           "mem_vs_floor_min", "mem_vs_floor_max", "saved_mb", "infer_ms", "infer_merged_ms", "merged_vs_plain",
           "merged_vs_plain_min", "merged_vs_plain_max", "rounds", "precision", "device", "error"]  # fmt: skip


def _cell(row: dict, key: str) -> str:
    value = row.get(key, "")
    if key in ("step_ms", "peak_mem_mb", "infer_ms", "infer_merged_ms", "time_vs_floor", "mem_vs_floor",
               "merged_vs_plain") and f"{key}_min" in row:  # fmt: skip
        fmt = "{:,.2f}" if "vs" in key else "{:,.0f}" if "mem" in key else "{:,.1f}"
        return f"{fmt.format(value)} ({fmt.format(row[key + '_min'])}..{fmt.format(row[key + '_max'])})"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: list[dict]) -> str:
    shown = ["method", "trainable", "step_ms", "time_vs_floor", "peak_mem_mb", "mem_vs_floor", "saved_mb",
             "infer_ms", "infer_merged_ms", "merged_vs_plain", "error"]  # fmt: skip
    shown = [c for c in shown if any(c in r for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r, c) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    argv = argv[1:] if argv[:1] == ["bench"] else argv  # `mmpeft bench ...` or `python -m mmpeft.bench ...`
    return records.command_line("mmpeft bench", argv)


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Runs every row `--rounds` times, interleaved, each in its own process; writes `<out>/<stem>.csv` and
    `.md` and returns the summarised rows (failed ones carry `failed: True`). Raises UnknownName for a bad
    method name before anything runs, BenchFailed when the floor does not run, and ResultsExist, right after
    the first floor, when the result file is there already and `args.overwrite` is not set (nothing is
    written then)."""
    from mmpeft.lab.records import process_environment

    order = bench_methods(args.methods, getattr(args, "checkpointing", "off"))
    rounds: list[dict[str, dict]] = []
    paths: tuple[Path, ...] = ()
    others = order[1:]
    for r in range(max(1, getattr(args, "rounds", 1))):
        shift = r % max(len(others), 1)
        results: dict[str, dict] = {}
        for name in ["floor", *others[shift:], *others[:shift]]:  # the floor first: it gives the file name
            print(f"bench: round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            results[name] = _run_worker(args, name)
            if name == "floor" and "error" in results[name]:
                reason = results[name]["error"].removeprefix("failed: ")
                raise BenchFailed(f"the floor did not run on {args.backbone!r}; nothing was timed or written: {reason}")
            if name == "floor" and not paths:
                paths = _check_outputs(args, results[name])
        rounds.append(results)
    rows = summarize(rounds, order)
    for row in rows:
        row["precision"] = args.precision
    _write(args, rows, rounds, paths, process_environment())
    return rows


def _check_outputs(args: argparse.Namespace, floor: dict) -> tuple[Path, ...]:
    out = Path(args.out)
    stem = result_stem(args, floor)
    paths = (out / f"{stem}.csv", out / f"{stem}.md")
    if getattr(args, "memory", False):
        paths += (out / f"{stem}-memory.md",)
    existing = [str(path) for path in paths if path.exists()]
    if existing and not getattr(args, "overwrite", False):
        raise ResultsExist(
            f"bench results already exist: {', '.join(existing)}; pass --overwrite to replace them, or --out DIR "
            "to write elsewhere (nothing was written)"
        )
    return paths


def _write(args: argparse.Namespace, rows: list[dict], rounds: list[dict], paths: tuple[Path, ...],
           env: dict[str, str]) -> None:  # fmt: skip
    floor = rows[0]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    device, shape = floor["device"].replace(" ", "_"), floor["input"]
    versions = ", ".join(f"{k} {v}" for k, v in env.items()) + records.git_commit()
    made = records.made_with(command_line(getattr(args, "argv", None)), versions)
    header = (
        f"# mmpeft bench: {args.backbone}, {_size(shape)} (input {shape}), batch {args.batch}, {device}, precision "
        f"{args.precision}\n\n{made}.\n\n"
        f"{args.rounds} rounds, every row once per round in its own process (order rotated per round); per "
        f"process the median of {args.steps} training steps (AdamW) after {args.warmup} warm-up steps. Cells: "
        "median over rounds (min..max); ratios to the floor paired per round. Peak memory: the process's peak "
        f"above its post-build baseline ({floor.get('peak_kind', '')}); saved_mb: what autograd keeps for "
        "backward in one step; merged_vs_plain: merged inference against the bare backbone, timed alternately in "
        "the same process (median of the per-pass ratios).\n\n"
    )
    if getattr(args, "allocator", "default") == "live":
        header += (f"Allocator: live (MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD}): every block of 128 KiB or "
                   "more is its own mapping, unmapped when freed, so the peak is that of live tensors, not of the "
                   "heap glibc keeps; steps are slower (page faults): compare these times only with each other."
                   "\n\n")  # fmt: skip
    table = markdown(rows)
    paths[1].write_text(header + table)
    print(header + table)
    print(f"bench: wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if getattr(args, "memory", False):
        intro = ("Tensors saved for backward in one training step, by the module running when each was saved "
                 "(each storage once; parameters excluded; block indices folded). "
                 "`mmpeft.lab.memory`.\n\n")  # fmt: skip
        last = rounds[-1]
        paths[2].write_text(header.replace("# mmpeft bench:", "# mmpeft bench --memory:", 1) + intro
                            + "\n".join(last[r["method"]]["breakdown"] for r in rows
                                        if "breakdown" in last.get(r["method"], {})))  # fmt: skip
        print(f"bench: wrote {paths[2]}", file=sys.stderr)
    _log_wandb(args, rows, paths[0].stem, env)


def _log_wandb(args: argparse.Namespace, rows: list[dict], stem: str, env: dict[str, str]) -> None:
    """Every row as a W&B run in group `stem` (offline by default; WANDB_MODE overrides; 'disabled' logs nothing)."""
    from mmpeft.lab.plot import log_table_to_wandb

    config = {"backbone": args.backbone, "batch": args.batch, "precision": args.precision, **env}
    clean = [{k: v for k, v in r.items() if k not in ("breakdown", "failed")} for r in rows]
    log_table_to_wandb(clean, group=stem, job_type="bench", config=config, mode=args.wandb)  # WANDB_DIR or ./wandb
