"""diffusers' `DiTTransformer2DModel` as an mmpeft backbone, with the original DiT's tying of the per-block
class tables and timestep MLPs into one (`TiedEmbedding`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmpeft.backbones.diffusion import DiffusersDenoiser, diffusers_source
from mmpeft.backbones.registry import register_backbone, register_backbone_prefix
from mmpeft.backbones.tiny_diffusers import TINY_DIT
from mmpeft.core.backbone import register_foreign_backbone
from mmpeft.core.context import BackboneInput

__all__ = ["CLASS_TABLE", "DiffusersDiT", "TiedEmbedding", "tie_dit_embeddings"]

CLASS_TABLE = "class_embedder.embedding_table.weight"  # a diffusers DiT's class table (the original's `y_embedder`)


class TiedEmbedding(nn.Module):
    """Block k's `norm1.emb` in a tied DiT: runs block 0's timestep MLP and class table (`source`).

    It holds no tensors of its own, so the tied model has one name per tensor (block 0's): counts,
    optimizers, adapter files and state dicts see one copy, as in the original DiT's single `t_embedder`
    / `y_embedder`. `save_pretrained` sets `emit_copies`, and the state dict then also holds block 0's
    tensors (cloned) under this block's keys: the diffusers layout, which expects a copy per block.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a child: block 0's tensors keep their one name
        self.emit_copies = False
        self.register_state_dict_post_hook(_emit_tied_copies)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.source(*args, **kwargs)


def _emit_tied_copies(module: TiedEmbedding, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.emit_copies:
        for key, value in module.source.state_dict().items():
            state_dict[prefix + key] = value.detach().clone()  # separate storage: safetensors refuses shared tensors


class _SaveEveryCopy:
    """`save_pretrained` of a tied diffusers DiT: diffusers' own, with every block's `norm1.emb` written out
    (as separate tensors; safetensors refuses tensors that share memory), so diffusers loads the folder."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tied = [m for m in self.model.modules() if isinstance(m, TiedEmbedding)]
        for m in tied:
            m.emit_copies = True
        try:
            return type(self.model).save_pretrained(self.model, *args, **kwargs)
        finally:
            for m in tied:
                m.emit_copies = False


class DiffusersDiT(DiffusersDenoiser):
    """A class-conditional `DiTTransformer2DModel`; `cond` is the class labels [B].

    Registered names: `diffusers_dit:<local folder or file>`, and `tiny_dit` (diffusers' DiT test
    config with 10 classes, random weights).

    Args (besides the base class's):
        tie_embeddings: diffusers gives every block its own `norm1.emb` (timestep MLP + class table) holding
            the same values, where the original DiT has one `t_embedder` / `y_embedder`: 27 redundant copies,
            74,991,744 parameters on DiT-XL/2 (749,826,464 -> 674,834,720), 32,288,256 of them class tables.
            True (default) makes every block run block 0's copy (`TiedEmbedding`, in place on a `model` passed
            in; the final layer already reads block 0's), so methods that train the table or the timestep
            biases train one copy, as in the paper. Loaded weights whose copies differ (a randomly initialised
            model saved as is) are kept untied, with a warning, rather than silently changed; a model built
            from `config` or a shipped config's name (`source: tiny_dit`), or on the meta device (no values to
            compare), is tied by construction (block 0's random draws). `model.save_pretrained(...)` still
            writes every block's copy, so the folder loads in plain diffusers.
        num_classes: a fresh class table for a new dataset: K classes plus the classifier-free-guidance null
            row (diffusers' `LabelEmbedding` convention, K+1 rows; the null label is K), initialised as
            diffusers initialises it (`nn.Embedding`'s N(0, 1); the original DiT code uses N(0, 0.02)), with
            the config's `num_embeds_ada_norm` set to K so a saved model reloads. Untied, every block gets
            a copy of the same table. The fresh table is the task's (`task_owned`): it trains under every
            method and is saved in the adapter file.
        add_classes: N new labels K..K+N-1 after the pretrained K, for personalization (a new subject as a new
            class, DreamBooth's rare token): the pretrained rows are kept, and the null row moves to the end
            (K+N). The grown table is the task's, as a fresh one is.
        new_class_init: the pretrained label each new row starts from (DreamBooth's class noun: "a sks dog"
            starts from what "dog" means), one per new row; default: the mean of the pretrained class rows.
    """

    family = "dit"
    class_name = "DiTTransformer2DModel"
    subfolder = "transformer"
    prefix = "diffusers_dit"
    shipped_configs = {"tiny_dit": TINY_DIT}

    def __init__(
        self,
        source: str | None = None,
        config: dict[str, Any] | str | None = None,
        model: nn.Module | None = None,
        name: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        example_size: int | None = None,
        example_tokens: int = 77,
        tie_embeddings: bool = True,
        num_classes: int | None = None,
        add_classes: int = 0,
        new_class_init: list[int] | None = None,
    ):
        super().__init__(source, config, model, name, dtype, device, example_size, example_tokens)
        if num_classes is not None and add_classes:
            raise ValueError("give num_classes (a fresh table for a new dataset) or add_classes (new labels after "
                             "the pretrained ones), not both")  # fmt: skip
        self.fresh_class_table = False
        if num_classes is not None:
            self._fresh_class_table(num_classes)
        if tie_embeddings and len(self.model.transformer_blocks) > 1:
            differ = [] if self.built_from_config else _differing_copies(self.model)
            if differ:
                warnings.warn(untied_warning(self.name, differ), stacklevel=2)
            else:
                tie_dit_embeddings(self.model)
        if add_classes:
            self.add_class_rows(add_classes, new_class_init)
        elif new_class_init:
            raise ValueError("new_class_init names where new class rows start; give add_classes as well")

    def task_owned(self) -> list[str]:
        """A fresh class table (`num_classes`; every block's copy when untied): it belongs to the new dataset, not
        to the pretrained model, so it trains under every method (LoRA, SVFit, BitFit as well as DiffFit), counts as
        trainable and goes in the adapter file, as a classifier's head does."""
        if not self.fresh_class_table:
            return []
        return [n for n, _ in self.named_parameters() if n.endswith(CLASS_TABLE)]

    @property
    def num_classes(self) -> int:
        """K: the class table holds labels 0..K-1; its row K (diffusers' K+1-row `LabelEmbedding`) is the
        classifier-free-guidance null class, which training drops labels to and sampling guides against."""
        return int(self.model.config.num_embeds_ada_norm)

    @property
    def tied(self) -> bool:
        return any(isinstance(m, TiedEmbedding) for m in self.model.modules())

    def _fresh_class_table(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        labels = self.model.transformer_blocks[0].norm1.emb.class_embedder
        old = labels.embedding_table.weight
        rows = num_classes + int(labels.dropout_prob > 0)  # + the CFG null row
        table = nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype)
        self._set_class_tables(lambda _: table.weight.detach().clone(), num_classes)

    def add_class_rows(self, count: int, init: list[int] | None = None) -> None:
        """`add_classes` / `new_class_init`: grow every class table by `count` rows before the null row, keeping
        the pretrained rows (called after the pretrained weights are in, by a subclass that loads them itself)."""
        if count < 1:
            raise ValueError(f"add_classes must be positive, got {count}")
        k = self.num_classes
        if init is not None and (len(init) != count or not all(0 <= label < k for label in init)):
            wanted = f"one pretrained label (0..{k - 1}) per new row ({count})"
            raise ValueError(f"new_class_init needs {wanted}, got {init}")

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old[list(init)] if init is not None else old[:k].mean(0, keepdim=True).expand(count, -1)
            return torch.cat([old[:k], new, old[k:]]).detach().clone()  # old[k:]: the null row, if any

        self._set_class_tables(grown, k + count)

    def _set_class_tables(self, rows_from: Callable[[torch.Tensor], torch.Tensor], num_classes: int) -> None:
        """Every block's own class table (one when tied) replaced by `rows_from(its old weight)`, frozen, and the
        label count set where diffusers reads it (the null label, the config a saved model reloads with)."""
        for block in self.model.transformer_blocks:
            embedder = block.norm1.emb
            if isinstance(embedder, TiedEmbedding):
                continue
            labels = embedder.class_embedder
            weight = rows_from(labels.embedding_table.weight)
            labels.embedding_table = nn.Embedding.from_pretrained(weight, freeze=True)
            labels.num_classes = num_classes
        self.model.register_to_config(num_embeds_ada_norm=num_classes)
        self.fresh_class_table = True

    def call_model(self, inputs: BackboneInput) -> Any:
        return self.model(inputs.x, timestep=inputs.timestep, class_labels=inputs.cond, **inputs.kwargs)

    def example_cond(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randint(0, self.model.config.num_embeds_ada_norm, (batch,), generator=generator)


def untied_warning(name: str, differ: list[int]) -> str:
    """Why a DiT asked to tie stays untied, and what that means for the methods that train its embeddings."""
    blocks = f"{differ[:5]}{'...' if len(differ) > 5 else ''}"
    return (
        f"{name}: the blocks' norm1.emb copies (timestep MLP + class table) differ from block 0's in blocks {blocks} "
        "(a checkpoint converted from DiT has equal copies; these weights look randomly initialised or trained "
        "untied), so they are kept untied: tying would replace them by block 0's and change the model. Methods that "
        "train the class table or the timestep biases (DiffFit, BitFit) then train one copy per block; pass "
        "tie_embeddings=False to say the untied model is meant (this warning then goes)"
    )


def _differing_copies(model: nn.Module) -> list[int]:
    """Blocks whose `norm1.emb` tensors differ from block 0's (none on the meta device: no values to compare)."""
    blocks = model.transformer_blocks
    reference = blocks[0].norm1.emb.state_dict()
    if any(t.device.type == "meta" for t in reference.values()):
        return []
    differ = []
    for i, block in enumerate(blocks):
        if not i or isinstance(block.norm1.emb, TiedEmbedding):  # tied already (a model wrapped twice)
            continue
        state = block.norm1.emb.state_dict()
        if state.keys() != reference.keys() or any(not torch.equal(v, reference[k]) for k, v in state.items()):
            differ.append(i)
    return differ


def tie_dit_embeddings(model: nn.Module) -> None:
    """Make every block of a diffusers DiT run block 0's `norm1.emb` (see `DiffusersDiT`, `tie_embeddings`)."""
    blocks = model.transformer_blocks
    source = blocks[0].norm1.emb
    for block in blocks[1:]:
        if not isinstance(block.norm1.emb, TiedEmbedding):
            block.norm1.emb = TiedEmbedding(source)
    model.save_pretrained = _SaveEveryCopy(model)  # an instance attribute: diffusers' own, writing every copy


@register_backbone_prefix("diffusers_dit", usage="diffusers_dit:<path>", family=DiffusersDiT.family)
def diffusers_dit(source: str, **kwargs: Any) -> DiffusersDiT:
    """a DiTTransformer2DModel from a local diffusers folder or weights file"""
    return DiffusersDiT(source=diffusers_source("diffusers_dit", source), **kwargs)


@register_backbone("tiny_dit", family=DiffusersDiT.family, takes_weights=False)
def tiny_dit(**kwargs: Any) -> DiffusersDiT:
    """diffusers' DiT pipeline test config with 10 classes, random weights, for tests and smoke runs"""
    return DiffusersDiT(config=TINY_DIT, name="tiny_dit", **kwargs)


# a raw diffusers DiT handed to PeftModel is wrapped
register_foreign_backbone("DiTTransformer2DModel", "mmpeft.backbones.dit:DiffusersDiT")
