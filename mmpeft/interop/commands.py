"""`mmpeft export-lora` and `mmpeft import-lora`: an mmpeft adapter file <-> a diffusers LoRA file.

Both rebuild the UNet the file was trained on from a local diffusers folder (or `tiny_sd`), so the adapter
header's backbone check applies, and neither overwrites an existing output unless asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpeft.core.errors import MmpeftError, OutputExists

__all__ = ["add_export_arguments", "add_import_arguments", "export_lora_command", "import_lora_command"]


def _unet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unet",
        required=True,
        help="the Stable Diffusion the LoRA belongs to: a local diffusers pipeline folder, its unet/ folder, "
        "or tiny_sd (the shipped tiny random SD)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="an mmpeft adapter file (adapter.safetensors of a LoRA run on a UNet)")
    parser.add_argument(
        "--out",
        required=True,
        help="a folder (the file is <out>/pytorch_lora_weights.safetensors, what pipe.load_lora_weights(out) "
        "finds) or a .safetensors path",
    )
    parser.add_argument(
        "--key-style",
        choices=("peft", "diffusers"),
        default="peft",
        help="peft: lora_A / lora_B keys (diffusers' current files); diffusers: lora.down / lora.up, as the "
        "DreamBooth LoRA script writes",
    )
    _unet_arguments(parser)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="a diffusers LoRA file or the folder holding pytorch_lora_weights.safetensors")
    parser.add_argument("--out", required=True, help="the mmpeft adapter file to write (.safetensors)")
    parser.add_argument(
        "--text-encoder",
        choices=("error", "ignore"),
        default="error",
        help="a file that also adapts the text encoder: refuse (error) or import the UNet part only (ignore)",
    )
    _unet_arguments(parser)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExists(f"{str(path)!r} already exists; pass --overwrite to replace it, or choose another --out")


def _unet(source: str):
    from mmpeft.backbones.diffusion import DiffusersUNet  # noqa: PLC0415

    return DiffusersUNet(source=source)


def export_lora_command(args: argparse.Namespace) -> int:
    from mmpeft.core.method import method_from_config  # noqa: PLC0415
    from mmpeft.core.model import PeftModel  # noqa: PLC0415
    from mmpeft.core.state import load_adapter, read_adapter  # noqa: PLC0415
    from mmpeft.interop.diffusers_lora import LORA_WEIGHT_NAME, export_diffusers_lora  # noqa: PLC0415

    out = Path(args.out)
    file = out if out.suffix == ".safetensors" else out / LORA_WEIGHT_NAME
    _refuse_existing(file, args.overwrite)
    _, header = read_adapter(args.adapter)
    model = PeftModel(_unet(args.unet), method_from_config(header["method"]))
    load_adapter(model, args.adapter, components=False)
    written = export_diffusers_lora(model, out, key_style=args.key_style)
    left = ", ".join(header["components"])
    note = f" (the {left} part stays in the mmpeft file: the export holds the UNet's LoRA)" if left else ""
    print(f"wrote {written} ({written.stat().st_size / 1024:.1f} KiB){note}")
    return 0


def import_lora_command(args: argparse.Namespace) -> int:
    from mmpeft.core.state import save_adapter  # noqa: PLC0415
    from mmpeft.interop.diffusers_lora import import_diffusers_lora  # noqa: PLC0415

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise MmpeftError(f"--out {str(out)!r}: an mmpeft adapter file is a .safetensors file; end the path in it")
    _refuse_existing(out, args.overwrite)
    model = import_diffusers_lora(_unet(args.unet), args.lora, text_encoder=args.text_encoder)
    size = save_adapter(model, out, extra={"imported_from": str(Path(args.lora).resolve())})
    config = model.method.config()
    print(f"wrote {out} ({size / 1024:.1f} KiB): lora r={config['r']} alpha={config['alpha']} on "
          f"{len(model.trainable_state_dict()) // 2} layers")  # fmt: skip
    return 0
