"""`mmpeft export`: a trained diffusion run as files other tools load without mmpeft.

    mmpeft export --run runs/difffit/version_0 --format diffusers --out merged/   # merged unet/ (+ text_encoder/)
    mmpeft export -c configs/diffusion/svfit.yaml --adapter A.safetensors --format lora --out lora/

`diffusers`: the denoiser with any mergeable method folded in (`merge_and_unload` + `save_pretrained`);
`lora`: a diffusers LoRA file (`pipe.load_lora_weights`) from LoRA, or from SVFit as its exact rank-r LoRA;
`int`: EfficientDM's packed integer denoiser (`int_model.safetensors`, `mmpeft sample --int-model`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpeft.lab.run_configs import resolve_run, task_from_configs

__all__ = ["add_model_export_arguments", "model_export_command"]

FORMATS = ("diffusers", "lora", "int")


def add_model_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="run_dir", default=None, help="a run folder (its config.yaml and adapter.safetensors)")
    p.add_argument("-c", "--config", action="append", default=[], help="the run's config file(s), as for `fit`")
    p.add_argument("--adapter", default=None, help="an adapter file (default: the run folder's)")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="diffusers: the merged model's folders; lora: a diffusers LoRA file (LoRA, SVFit); int: "
                        "EfficientDM's integer model")  # fmt: skip
    p.add_argument("--out", default=None, help="the output folder (default: <run>/export-<format>)")


def model_export_command(args: argparse.Namespace) -> int:
    from mmpeft.core.errors import MmpeftError, OutputExists

    configs, adapter, out = resolve_run(args.run_dir, args.config, args.adapter, f"export-{args.format}")
    out = Path(args.out) if args.out else out
    if adapter is None:
        raise MmpeftError("mmpeft export needs the trained adapter: --run RUN_FOLDER or --adapter FILE")
    if out.exists() and any(out.iterdir()):
        raise OutputExists(f"{out} is not empty; give a new --out folder")
    task = task_from_configs(configs, adapter).eval()
    if args.format == "int":
        from mmpeft.interop.int_export import export_int

        out.mkdir(parents=True, exist_ok=True)
        path = export_int(task.model, out / "int_model.safetensors")
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KB; mmpeft sample --int-model {path})")
    elif args.format == "lora":
        from mmpeft.interop.diffusers_lora import export_diffusers_lora

        print(f"wrote {export_diffusers_lora(task.model, out)} (pipe.load_lora_weights({str(out)!r}))")
    else:
        from mmpeft.interop.merged_export import export_merged

        for part, folder in export_merged(task.model, out).items():
            print(f"wrote {part}: {folder}")
    return 0
