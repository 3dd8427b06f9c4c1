"""`mmpeft score`: metrics of a folder of generated images (what `mmpeft sample` writes), from local weights.

    mmpeft score runs/dreambooth-lora/version_0/samples --reference data/dog \\
        --clip ViT-B-32 --clip-weights clip.safetensors --dino vit_small_patch16_224.dino --dino-weights dino.pth

Writes `metrics.json` beside the images and prints it; a metric without weights is skipped with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmpeft.core.errors import MmpeftError

__all__ = ["add_score_arguments", "score_command"]


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="a folder of generated images (with mmpeft sample's samples.json for prompts)")
    p.add_argument("--reference", default=None, help="a folder of real images (CLIP-I, DINO, FID)")
    p.add_argument("--clip", default="ViT-B-32", help="the open_clip model name of --clip-weights")
    p.add_argument("--clip-weights", default=None, help="a local open_clip checkpoint (CLIP-T, CLIP-I)")
    p.add_argument("--dino", default="vit_small_patch16_224.dino", help="the timm model name of --dino-weights")
    p.add_argument("--dino-weights", default=None, help="a local timm DINO checkpoint (DINO)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception weights file (FID)")


def _images(folder: Path) -> list:
    from PIL import Image

    from mmpeft.data.dreambooth import image_files

    files = [f for f in image_files(folder) if f.name != "grid.png"]
    if not files:
        raise MmpeftError(f"{folder} holds no images")
    return [Image.open(f).convert("RGB") for f in files]


def score_command(args: argparse.Namespace) -> int:
    from mmpeft.interop.image_metrics import score_images

    folder = Path(args.samples)
    if not folder.is_dir():
        raise MmpeftError(f"{folder} is not a folder of images")
    images = _images(folder)
    record = folder / "samples.json"
    prompts = None
    if record.is_file():
        listed = [item.get("prompt") for item in json.loads(record.read_text())["images"]]
        prompts = listed if all(p is not None for p in listed) and len(listed) == len(images) else None
    references = _images(Path(args.reference)) if args.reference else None
    clip = dino = None
    if args.clip_weights:
        import open_clip

        from mmpeft.backbones.clip import create_open_clip

        clip = (create_open_clip(args.clip, args.clip_weights), open_clip.get_tokenizer(args.clip))
    if args.dino_weights:
        import timm

        dino = timm.create_model(args.dino, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": args.dino_weights})  # fmt: skip
    scores = score_images(images, prompts, references, clip, dino, inception_weights=args.inception_weights)
    (folder / "metrics.json").write_text(json.dumps({"images": len(images), **scores}, indent=1))
    print(json.dumps(scores, indent=1))
    return 0
