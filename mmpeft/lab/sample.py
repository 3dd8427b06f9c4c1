"""`mmpeft sample`: images from a trained diffusion run (its config and adapter file, or a run folder holding both),
through diffusers' pipelines (`mmpeft.interop.sampling`); writes each image and one grid PNG.

    mmpeft sample --run runs/diffusion-lora/version_0 --prompt "a photo of sks dog" --seeds 0,1,2,3
    mmpeft sample -c configs/diffusion/difffit_dit.yaml --adapter A.safetensors --class-ids 1,2 --out samples/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mmpeft.core.errors import MmpeftError, OutputExists
from mmpeft.lab.run_configs import resolve_run, task_from_configs

__all__ = ["add_sample_arguments", "sample_command"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    from mmpeft.interop.sampling import SCHEDULERS

    p.add_argument("--run", dest="run_dir", default=None, help="a run folder (its config.yaml and adapter.safetensors)")
    p.add_argument("-c", "--config", action="append", default=[], help="the run's config file(s), as for `fit`")
    p.add_argument("--adapter", default=None, help="an adapter file (default: the run folder's)")
    p.add_argument("--source", default=None,
                   help="the denoiser's weights from this folder (a merged export's unet/; no adapter)")  # fmt: skip
    p.add_argument(
        "--int-model",
        default=None,
        help="an EfficientDM integer export (int_model.safetensors): sample the integer model instead",
    )
    p.add_argument(
        "--int-mode",
        choices=["dequantize", "int"],
        default="dequantize",
        help="the integer model's weights dequantized once at load, or integer matmuls (torch._int_mm)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several); text-to-image UNets")
    p.add_argument("--class-ids", type=_ints, default=[], help="class ids, e.g. 1,5 (class-conditional DiTs)")
    p.add_argument("--seeds", type=_ints, default=[0], help="one image per seed and prompt / class (default 0)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default 7.5 for prompts, 4.0 for classes; 1: off)")  # fmt: skip
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim", help="diffusers scheduler (default ddim)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--negative-prompt", default=None, help="the text guidance steers away from")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="the folder for the images and grid.png (default: <run>/samples)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds images already")


def use_int_model(task: Any, path: str, mode: str) -> None:
    """Put the integer model of an EfficientDM export (`mmpeft.interop.int_export`) in the task's place: the
    config's denoiser rebuilt pristine, the file's integers and tables loaded on it, the task's other components
    (a text encoder) kept."""
    from mmpeft.interop.int_export import load_int_model

    old = task.model
    model = load_int_model(path, old.unload(), mode)
    for name, component in getattr(old, "components", {}).items():
        model.add_component(name, component)
    task.model = model.eval()


def sample_command(args: argparse.Namespace) -> int:
    import torch

    from mmpeft.interop.sampling import build_pipeline, generate, write_images

    if bool(args.prompt) == bool(args.class_ids):
        raise MmpeftError("pass --prompt (text-conditioned UNets) or --class-ids (class-conditional DiTs), one of them")
    configs, adapter, out = resolve_run(args.run_dir, args.config, args.adapter, "samples")
    out = Path(args.out) if args.out else out
    if args.source is not None and args.adapter is None:
        adapter = None  # a merged folder holds the trained weights; the run folder's adapter would apply them twice
    elif adapter is None:
        print("mmpeft sample: no adapter file given: sampling the frozen model as its config builds it")
    if out.is_dir() and any(out.glob("*.png")) and not args.overwrite:
        raise OutputExists(f"{out} holds images already; pass --overwrite or another --out")
    start = time.perf_counter()
    if args.int_model is not None:
        adapter = None  # the integer file holds the whole trained denoiser
    task = task_from_configs(configs, adapter, args.source).eval()
    if args.int_model is not None:
        use_int_model(task, args.int_model, args.int_mode)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = build_pipeline(task.to(device), args.scheduler).to(device)
    guidance = args.guidance_scale if args.guidance_scale is not None else (7.5 if args.prompt else 4.0)
    images = generate(pipe, args.seeds, args.prompt, args.class_ids, args.steps, guidance, args.size,
                      args.negative_prompt)  # fmt: skip
    grid = write_images(images, out)
    (out / "samples.json").write_text(json.dumps({
        "configs": configs, "adapter": adapter, "source": args.source, "int_model": args.int_model,
        "scheduler": args.scheduler, "steps": args.steps,
        "guidance_scale": guidance, "seeds": args.seeds, "size": args.size,
        "images": [{"file": f"{i:03d}-seed{im.seed}.png", "seed": im.seed, "prompt": im.prompt,
                    "class_id": im.class_id} for i, im in enumerate(images)],
    }, indent=1))  # fmt: skip
    print(f"wrote {len(images)} images and {grid} ({time.perf_counter() - start:.1f} s, {args.scheduler}, "
          f"{args.steps} steps, guidance {guidance:g})")  # fmt: skip
    return 0
