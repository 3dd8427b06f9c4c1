"""`mmpeft export-lora` and `mmpeft import-lora`: an mmpeft adapter file <-> a diffusers LoRA file.

Both rebuild the UNet the file was trained on from a local diffusers folder (or `tiny_sd`), and its text
encoder when the LoRA adapts that too (a run with `text_method`), so the adapter header's backbone check
applies, and neither overwrites an existing output unless asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpeft.core.errors import MmpeftError, NotSupported, OutputExists, WeightsUnavailable

__all__ = ["add_export_arguments", "add_import_arguments", "export_lora_command", "import_lora_command"]


def _unet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unet",
        required=True,
        help="the Stable Diffusion the LoRA belongs to: a local diffusers pipeline folder (its text_encoder/ is "
        "read when the LoRA adapts the text encoder too), its unet/ folder, or tiny_sd (the shipped tiny random SD)",
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
        choices=("peft", "diffusers"),  # diffusers_lora.KEY_STYLES; imported lazily, as torch is
        default="peft",
        help="peft: lora_A / lora_B keys (diffusers' current files); diffusers: diffusers' "
        "convert_state_dict_to_diffusers names (attention projections as lora.down / lora.up), as its DreamBooth "
        "LoRA script writes",
    )
    parser.add_argument(
        "--text-encoder",
        choices=("include", "ignore"),
        default="include",
        help="a run that adapted the text encoder too (text_method): include its LoRA (text_encoder.* keys; a "
        "text method other than LoRA has no diffusers form and is refused), or write the UNet part alone (ignore)",
    )
    _unet_arguments(parser)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="a diffusers LoRA file or the folder holding pytorch_lora_weights.safetensors")
    parser.add_argument("--out", required=True, help="the mmpeft adapter file to write (.safetensors)")
    parser.add_argument(
        "--text-encoder",
        choices=("import", "error", "ignore"),
        default="import",
        help="a file that also adapts the text encoder: import its LoRA too, as the adapter's text_encoder "
        "component (the text_method of a LatentDiffusion run; needs the pipeline folder's text_encoder/), refuse "
        "(error), or import the UNet part only (ignore)",
    )
    _unet_arguments(parser)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExists(f"{str(path)!r} already exists; pass --overwrite to replace it, or choose another --out")


def _unet(source: str):
    from mmpeft.backbones.diffusion import DiffusersUNet

    return DiffusersUNet(source=source)


def _text_encoder(source: str):
    """The CLIP text encoder of the pipeline `--unet` names: its `text_encoder/` (beside `unet/` when `--unet` is
    the unet folder or a weights file in it)."""
    from transformers import CLIPTextModel

    from mmpeft.backbones.diffusers_files import load_pretrained

    if source == "tiny_sd":
        from mmpeft.backbones.tiny_diffusers import tiny_sd_folder

        return load_pretrained(CLIPTextModel, tiny_sd_folder() / "text_encoder")
    path = Path(source).expanduser()
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "text_encoder" / "config.json").is_file():
            return load_pretrained(CLIPTextModel, folder / "text_encoder")
    raise WeightsUnavailable(
        f"the LoRA adapts the text encoder, but {source!r} has no text_encoder/ (nor beside it): pass the pipeline "
        "folder as --unet, or --text-encoder ignore to leave the text encoder's part out"
    )


def export_lora_command(args: argparse.Namespace) -> int:
    from mmpeft.core.method import method_from_config
    from mmpeft.core.model import PeftModel
    from mmpeft.core.state import load_adapter, read_adapter
    from mmpeft.interop.diffusers_lora import LORA_WEIGHT_NAME, TEXT_ENCODER, export_diffusers_lora

    out = Path(args.out)
    file = out if out.suffix == ".safetensors" else out / LORA_WEIGHT_NAME
    _refuse_existing(file, args.overwrite)
    _, header = read_adapter(args.adapter)
    components = header["components"] if args.text_encoder == "include" else {}
    unknown = sorted(set(components) - {TEXT_ENCODER})
    if unknown:
        raise NotSupported(f"the adapter adapts components {unknown}, which a diffusers LoRA file has no place for")
    model = PeftModel(_unet(args.unet), method_from_config(header["method"]))
    for name, spec in components.items():
        model.add_component(name, _text_encoder(args.unet), method_from_config(spec))
    load_adapter(model, args.adapter, components=bool(components))
    written = export_diffusers_lora(model, out, key_style=args.key_style, text_encoder=args.text_encoder)
    parts = "UNet and text-encoder LoRA" if components else "UNet LoRA"
    left = ", ".join(header["components"]) if not components else ""
    note = f"; the {left} part is left out (--text-encoder ignore) and stays in the mmpeft file" if left else ""
    print(f"wrote {written} ({written.stat().st_size / 1024:.1f} KiB: {parts}{note})")
    return 0


def import_lora_command(args: argparse.Namespace) -> int:
    from mmpeft.core.state import save_adapter
    from mmpeft.interop.diffusers_lora import TEXT_ENCODER, import_diffusers_lora, read_diffusers_lora

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise MmpeftError(f"--out {str(out)!r}: an mmpeft adapter file is a .safetensors file; end the path in it")
    _refuse_existing(out, args.overwrite)
    lora_file = read_diffusers_lora(args.lora, text_encoder=args.text_encoder)
    text_model = _text_encoder(args.unet) if lora_file.text_modules else None
    model = import_diffusers_lora(_unet(args.unet), args.lora, text_encoder=args.text_encoder, text_model=text_model)
    size = save_adapter(model, out, extra={"imported_from": str(Path(args.lora).resolve())})
    config = model.method.config()
    text = getattr(model, "component_methods", {}).get(TEXT_ENCODER)
    also = f"; text encoder: lora r={text.r} alpha={text.alpha} on {len(lora_file.text_modules)} layers" if text else ""
    print(f"wrote {out} ({size / 1024:.1f} KiB): lora r={config['r']} alpha={config['alpha']} on "
          f"{len(lora_file.modules)} UNet layers{also}")  # fmt: skip
    return 0
