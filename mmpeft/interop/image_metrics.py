"""Scores of generated images, from well-kept libraries and weights the user provides (a local file; nothing is
downloaded):

- CLIP-T: the mean cosine between each image's CLIP embedding and its prompt's (DreamBooth's prompt fidelity);
- CLIP-I: the mean cosine between CLIP embeddings of generated and reference images (subject fidelity);
- DINO: the same with a DINO ViT's CLS embedding (DreamBooth's preferred subject metric; Ruiz et al., CVPR 2023);
- FID: torchmetrics' `FrechetInceptionDistance`, on Inception features (torch-fidelity's network, weights from a
  local file) or on any feature module given (the digits quickstart's classifier).

A metric whose weights are not given is skipped with one line saying how to enable it, and its value is absent
from the result, never zero. Images are PIL images or [N, 3, H, W] tensors in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["clip_scores", "dino_score", "fid_score", "score_images", "to_tensor_batch"]


def to_tensor_batch(images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] from PIL images (all one size) or a tensor already so."""
    if isinstance(images, torch.Tensor):
        return images.float()
    from torchvision.transforms.functional import pil_to_tensor

    return torch.stack([pil_to_tensor(im.convert("RGB")).float() / 255 for im in images])


def _embed(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int, mean, std,
           batch: int = 32) -> torch.Tensor:  # fmt: skip
    """L2-normalised embeddings of images resized (short side, bicubic) and centre-cropped to `size`."""
    from torchvision.transforms import functional as TF

    out = []
    for chunk in images.split(batch):
        x = TF.center_crop(TF.resize(chunk, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
        x = TF.normalize(x, mean, std)
        out.append(F.normalize(encode(x).float(), dim=-1))
    return torch.cat(out)


def _mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b.T).mean())


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@torch.no_grad()
def clip_scores(clip: nn.Module, tokenizer: Any, images: Any, prompts: Sequence[str] | None = None,
                references: Any = None) -> dict[str, float]:  # fmt: skip
    """{"clip_t": ..., "clip_i": ...} with an open_clip model (`encode_image`, `encode_text`) and its tokenizer;
    `prompts`: one per image (CLIP-T); `references`: real images (CLIP-I, all pairs)."""
    clip = clip.eval()
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    generated = _embed(clip.encode_image, to_tensor_batch(images), size, CLIP_MEAN, CLIP_STD)
    out = {}
    if prompts is not None:
        if len(prompts) != len(generated):
            raise ValueError(f"clip_t needs one prompt per image: {len(prompts)} prompts, {len(generated)} images")
        text = F.normalize(clip.encode_text(tokenizer(list(prompts))).float(), dim=-1)
        out["clip_t"] = float((generated * text).sum(-1).mean())
    if references is not None:
        real = _embed(clip.encode_image, to_tensor_batch(references), size, CLIP_MEAN, CLIP_STD)
        out["clip_i"] = _mean_pairwise_cosine(generated, real)
    return out


@torch.no_grad()
def dino_score(dino: nn.Module, images: Any, references: Any, size: int = 224) -> float:
    """The mean cosine between the CLS embeddings (a timm ViT's `forward_features`, token 0) of generated and
    reference images, all pairs (DreamBooth's DINO metric with a DINO ViT-S/16)."""
    dino = dino.eval()

    def cls_token(x: torch.Tensor) -> torch.Tensor:
        features = dino.forward_features(x)
        return features[:, 0] if features.dim() == 3 else features

    ours = _embed(cls_token, to_tensor_batch(images), size, IMAGENET_MEAN, IMAGENET_STD)
    real = _embed(cls_token, to_tensor_batch(references), size, IMAGENET_MEAN, IMAGENET_STD)
    return _mean_pairwise_cosine(ours, real)


class _Features(nn.Module):
    """A feature module in the shape torchmetrics' FID takes: uint8 or float [N, 3, H, W] -> [N, D] float64-able."""

    def __init__(self, features: nn.Module, num_features: int | None = None):
        super().__init__()
        self.features = features.eval()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.features(x).flatten(1)


@torch.no_grad()
def fid_score(images: Any, references: Any, features: nn.Module | None = None, inception_weights: str | None = None,
              batch: int = 64) -> float:  # fmt: skip
    """Fréchet distance between generated and reference images: torchmetrics' FID on `features` (a module from
    [N, 3, H, W] in [0, 1] to [N, D]), or on Inception-v3 features from a local torch-fidelity weights file."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features is not None:
        dim = int(_Features(features)(to_tensor_batch(references[:1])).shape[1])
        metric = FrechetInceptionDistance(feature=_Features(features, dim), normalize=True)
    elif inception_weights is not None:
        metric = FrechetInceptionDistance(2048, normalize=True, feature_extractor_weights_path=inception_weights)
    else:
        raise ValueError("fid_score needs a feature module or a local Inception weights file")
    for real, chunk in itertools.chain(((True, c) for c in to_tensor_batch(references).split(batch)),
                                       ((False, c) for c in to_tensor_batch(images).split(batch))):  # fmt: skip
        metric.update(chunk.clamp(0, 1), real=real)
    return float(metric.compute())


def score_images(images: Any, prompts: Sequence[str] | None = None, references: Any = None,
                 clip: tuple[nn.Module, Any] | None = None, dino: nn.Module | None = None,
                 fid_features: nn.Module | None = None, inception_weights: str | None = None,
                 log: Callable[[str], None] = print) -> dict[str, float]:  # fmt: skip
    """Every metric whose model is given (see the module docstring); each missing one is named once, and left out."""
    out: dict[str, float] = {}
    if clip is None:
        log("metrics: CLIP-T / CLIP-I skipped: no CLIP weights given (--clip-weights FILE, an open_clip checkpoint)")
    else:
        out |= clip_scores(clip[0], clip[1], images, prompts, references)
    if references is None:
        log("metrics: DINO and FID skipped: no reference images given (--reference FOLDER)")
        return out
    if dino is None:
        log("metrics: DINO skipped: no DINO weights given (--dino-weights FILE, a timm DINO ViT-S/16 checkpoint)")
    else:
        out["dino"] = dino_score(dino, images, references)
    if fid_features is None and inception_weights is None:
        log("metrics: FID skipped: no Inception weights given (--inception-weights FILE: torch-fidelity's)")
    else:
        out["fid"] = fid_score(images, references, fid_features, inception_weights)
    return out
