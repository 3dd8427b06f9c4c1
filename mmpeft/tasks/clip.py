"""CLIP classification: a zero-shot classifier built from the text tower, PEFT on the image tower and,
optionally, on the text tower too."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.backbones import backbone_from_spec
from mmpeft.core.method import Method, apply_frozen_mode, method_from_spec
from mmpeft.tasks.classification import ImageClassification

__all__ = ["ZeroShotHead", "CLIPClassification", "resolve_class_names", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def resolve_class_names(class_names: list[str] | str) -> list[str]:
    """A list, or "<metadata>:<task>" (e.g. "vtab1k:eurosat", "fgvc:cub") read from `datasets/`.

    NABirds ships its names in its own classes.txt: "fgvc:nabirds@/data/nabirds" reads them from there.
    """
    if not isinstance(class_names, str):
        return list(class_names)
    from mmpeft.data.metadata import class_names as dataset_class_names

    key, _, root = class_names.partition("@")
    source, _, task = key.partition(":")
    names = dataset_class_names(source, task, root or None)
    return [str(n).replace("_", " ") for n in names]


class ZeroShotHead(nn.Module):
    """logits = scale · norm(f_image) · Wᵀ, W = the normalised mean over templates of the normalised
    text embeddings of every class prompt (open_clip's `build_zero_shot_classifier`).

    With a frozen text tower W is computed once and cached; with a text-tower method it is recomputed
    every step so gradients reach the text tower's method modules.
    """

    def __init__(self, text_tower: nn.Module, token_ids: torch.Tensor, logit_scale: float,
                 text_method: Method | None = None, train_classifier: bool = False):  # fmt: skip
        super().__init__()
        if text_method is not None and train_classifier:
            raise ValueError("train either the classifier (linear probe from zero-shot) or the text tower, not both")
        self.text_tower, self.logit_scale, self.text_method = text_tower, logit_scale, text_method
        self.register_buffer("token_ids", token_ids, persistent=False)  # [classes, templates, context]
        if text_method is not None:
            text_method.apply(text_tower)
        else:
            text_tower.requires_grad_(False)
        # a frozen text tower gives fixed class weights: computed once, a buffer so they follow .to(device)
        self.register_buffer("frozen_weights", None if text_method else self._embed_classes(), persistent=False)
        self.classifier = nn.Parameter(self.frozen_weights.clone()) if train_classifier else None
        self._eval_weights: torch.Tensor | None = None  # text-method weights, reused across one evaluation

    @property
    def trains_text(self) -> bool:
        return self.text_method is not None

    def class_embeddings(self) -> torch.Tensor:
        c, t, length = self.token_ids.shape
        features = F.normalize(self.text_tower(self.token_ids.view(c * t, length)), dim=-1)
        return F.normalize(features.view(c, t, -1).mean(1), dim=-1)

    def _embed_classes(self) -> torch.Tensor:
        was_training = self.text_tower.training
        self.text_tower.eval()
        with torch.no_grad():
            weights = self.class_embeddings()
        self.text_tower.train(was_training)
        return weights

    def weights(self) -> torch.Tensor:
        """The class weights: fixed for a frozen text tower; with a text method, recomputed every training
        step (gradients reach it) and once per evaluation (nothing changes until training resumes)."""
        if not self.trains_text:
            return self.frozen_weights
        if self.training:
            return self.class_embeddings()
        if self._eval_weights is None:
            self._eval_weights = self._embed_classes()
        return self._eval_weights

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        weights = self.classifier if self.classifier is not None else self.weights()
        return self.logit_scale * F.normalize(image_features, dim=-1) @ weights.t()

    def declared_trainable(self) -> list[str]:
        if self.classifier is not None:
            return ["classifier"]
        if not self.trains_text:
            return []
        return [f"text_tower.{n}" for n in self.text_method.declared_trainable(self.text_tower)]

    def train(self, mode: bool = True) -> ZeroShotHead:
        super().train(mode)
        self._eval_weights = None
        if self.trains_text:
            apply_frozen_mode(self.text_tower, mode, self.text_method.frozen_mode)
        else:
            self.text_tower.eval()
        return self


class CLIPClassification(ImageClassification):
    """Classification with a CLIP image tower (`backbone`, any method) and a zero-shot head built
    from `text_tower` with `class_names` x `templates`. `text_method` adapts the text tower too.

    Args:
        text_tower: a `ClipTextTower` of the same CLIP model (or its name, `open_clip:<model>:text`).
        class_names: a list, or "vtab1k:<task>" / "fgvc:<dataset>" from `datasets/`.
        templates: prompt templates with one `{}`; the class embedding averages over them.
        tokenizer: open_clip model name whose tokenizer to use (its BPE ships with open_clip).
        logit_scale: CLIP's temperature; 100 is the pretrained value and the few-shot convention.
        train_classifier: train the class weights, initialised from the zero-shot ones (a linear probe
            that starts at zero-shot accuracy, WiSE-FT style).
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        text_tower: nn.Module | str,
        class_names: list[str] | str,
        templates: list[str] | None = None,
        tokenizer: str = "ViT-B-32",
        text_method: str | dict[str, Any] | None = None,
        logit_scale: float = 100.0,
        train_classifier: bool = False,
        **kwargs: Any,
    ):
        import open_clip

        names = resolve_class_names(class_names)
        prompts = [t.format(n) for n in names for t in (templates or DEFAULT_TEMPLATES)]
        tokens = open_clip.get_tokenizer(tokenizer)(prompts).view(len(names), len(templates or DEFAULT_TEMPLATES), -1)
        adapter = kwargs.pop("adapter", None)
        kwargs["num_classes"] = len(names)
        super().__init__(backbone, **kwargs)
        self.class_names = names
        method = method_from_spec(text_method) if text_method else None
        self.model.head = ZeroShotHead(backbone_from_spec(text_tower), tokens, logit_scale, method, train_classifier)
        self.model.head_config = None  # built from the text tower and the class names, not from a spec
        self.model.apply_frozen_mode()
        if adapter:
            self.load_adapter(adapter)
