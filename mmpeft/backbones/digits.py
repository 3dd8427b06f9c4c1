"""A small ViT pretrained by mmpeft itself on the upstream digits, so the quickstart is a real transfer.

It is built on first use (about a minute on 2 CPU cores) and cached; the cache key is a hash of the
architecture and the pretraining recipe, so changing either rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmpeft.backbones.timm_vit import TimmViT
from mmpeft.backbones.weights import load_weights, read_state_dict

__all__ = ["DigitsViT", "pretrain_digits_vit", "cache_dir", "ARCH", "RECIPE"]

ARCH = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 128, "depth": 4, "num_heads": 4}
RECIPE = {"epochs": 40, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64, "warmup_epochs": 3, "seed": 0}


def cache_dir() -> Path:
    """`$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    return Path(os.environ.get("MMPEFT_CACHE", Path.home() / ".cache" / "mmpeft"))


def _key(recipe: dict) -> str:
    return hashlib.sha1(json.dumps({"arch": ARCH, "recipe": recipe}, sort_keys=True).encode()).hexdigest()[:10]


def pretrain_digits_vit(path: Path, recipe: dict, progress: bool = True) -> dict:
    """Full training of the ViT on the upstream digits (all ten classes, shift augmentation)."""
    from mmpeft.core.model import PeftModel  # noqa: PLC0415
    from mmpeft.data.digits import DigitsDataModule  # noqa: PLC0415
    from mmpeft.tasks.optim import build_optimizer, param_groups, warmup_cosine  # noqa: PLC0415

    torch.manual_seed(recipe["seed"])
    model = PeftModel(DigitsViT(pretrained=False), "full", num_classes=10)
    data = DigitsDataModule("upstream", batch_size=recipe["batch_size"], seed=recipe["seed"], train_fraction=0.9,
                            val_fraction=0.1)  # fmt: skip
    train = data.train_dataloader()
    optimizer = build_optimizer(param_groups(model, model.method, recipe["weight_decay"]), "adamw", recipe["lr"])
    steps = recipe["epochs"] * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, recipe["warmup_epochs"] * len(train)))
    start = time.perf_counter()
    bar = tqdm(range(recipe["epochs"]), desc="pretraining the digits ViT (upstream)", disable=not progress)
    for _ in bar:
        model.train()
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    info = {"upstream_val_acc": correct / total, "seconds": round(time.perf_counter() - start, 1),
            "recipe": recipe, "arch": ARCH}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(model.backbone.state_dict(), tmp, metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return info


class DigitsViT(TimmViT):
    """A 0.8M-parameter ViT at the digits' native 8x8 resolution (patch 2, 16 patches + CLS).

    Args:
        pretrained: load (building on first use) mmpeft's upstream-pretrained weights; False: random init.
        weights: a weights file instead (e.g. one copied from another machine's cache).
        epochs: the pretraining budget (part of the cache key).
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None, epochs: int | None = None):
        super().__init__("vit_tiny_patch16_224", **ARCH)
        self.name = "digits_vit"
        if weights is None and pretrained:
            recipe = {**RECIPE, **({"epochs": epochs} if epochs else {})}
            path = cache_dir() / f"digits_vit-{_key(recipe)}.safetensors"
            if not path.is_file():
                with torch.random.fork_rng():  # a fresh and a cached run then draw the same numbers afterwards
                    info = pretrain_digits_vit(path, recipe)
                print(f"pretrained the digits ViT in {info['seconds']} s, upstream val acc "
                      f"{info['upstream_val_acc']:.3f}; cached at {path}")  # fmt: skip
            weights = str(path)
        if weights is not None:
            load_weights(self, read_state_dict(weights), weights)
