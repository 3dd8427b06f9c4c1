"""`PeftModel`: a frozen backbone, one method applied to it, and a task head.

This is the unit the tasks train and the adapter files save. It owns the frozen-mode policy:
after every train/eval switch (Lightning makes many) the method's policy is re-applied.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from mmpeft.core.backbone import as_backbone
from mmpeft.core.heads import build_head, head_spec, load_checkpoint_head
from mmpeft.core.identity import weights_identity
from mmpeft.core.method import Method, apply_frozen_mode, method_from_spec
from mmpeft.core.modules import adapter_modules
from mmpeft.core.pristine import disabled

__all__ = ["PeftModel", "backbone_signature"]


class PeftModel(nn.Module):
    """`head(backbone(inputs))` with `method` applied to `backbone`.

    Args:
        backbone: an mmpeft backbone (token methods need a `TokenBackbone`); a diffusers
            `UNet2DConditionModel` / `DiTTransformer2DModel` is wrapped as one; any other module
            producing `[batch, num_features]` works with the name-targeted methods.
        method: a `Method`, a registered name (`"lora"`), a spec (`{"name": "lora", "r": 16}`), or None
            for the linear probe.
        num_classes: builds a head on `backbone.num_features`; 0 or None keeps the backbone's output
            (features, or a denoiser's prediction).
        head: the head's spec (`"linear"`, or `{name: mlp, hidden: [256, 256], norm: batch, dropout: 0.5}`; see
            `mmpeft.core.heads`), recorded in adapter files; or a custom module. Unset: the backbone's
            `default_head` (the paper's head, e.g. the point transformers' MLP-BN head), else linear. A backbone
            whose weights file held a head (`checkpoint_head`, e.g. an official fine-tuned Point-MAE file) gives
            it to the head built here; a head of another spec is refused (`load_checkpoint_head`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: Method | str | dict[str, Any] | None = "linear",
        num_classes: int | None = None,
        head: nn.Module | str | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.method = method_from_spec(method)
        backbone = as_backbone(backbone)
        features = int(getattr(backbone, "num_features", 0) or 0)
        custom = isinstance(head, nn.Module)
        if not custom and num_classes and not features:
            raise ValueError(
                f"{type(backbone).__name__} {getattr(backbone, 'name', '')!r} has no pooled features (num_features "
                "= 0, e.g. a denoiser), so it takes no classification head; pass num_classes=None"
            )
        if not custom and head is not None and not num_classes:
            raise ValueError(f"a head ({head!r}) needs num_classes")
        if head is None:
            head = getattr(backbone, "default_head", None)
        self.head_config = head_spec(head, num_classes) if not custom and num_classes else None
        weights_identity(backbone)  # the frozen weights' identity, taken before the method touches them
        self.backbone = self.method.apply(backbone)
        self.head_source: str | None = None  # the weights file the head came from (a fine-tuned checkpoint's own)
        if not custom:
            built = build_head(self.head_config, features, self.method.initial_head()) if num_classes else None
            if built is not None:
                found = getattr(backbone, "checkpoint_head", None)
                self.head_source = load_checkpoint_head(built, self.head_config, found)
            head = built.to(device=_device_of(backbone)) if built is not None else nn.Identity()
        self.head = head
        self.apply_frozen_mode()

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.backbone(inputs))

    def train(self, mode: bool = True) -> PeftModel:
        super().train(mode)
        self.apply_frozen_mode()
        return self

    def apply_frozen_mode(self) -> None:
        apply_frozen_mode(self.backbone, self.training, self.method.frozen_mode)
        for name, module in getattr(self, "components", {}).items():
            method = self.component_methods.get(name)
            if method is None:
                module.eval()
            else:
                apply_frozen_mode(module, self.training, method.frozen_mode)

    def cast_frozen(self, frozen_dtype: str) -> int:
        """Store the backbone's frozen matmul weights in `frozen_dtype` (bf16); the trainable set, the head and the
        norms stay fp32 (`mmpeft.core.precision`). Returns the elements cast. A task's components (a diffusion
        model's VAE and text encoder) stay as they are: they also run outside autocast (latent caches)."""
        from mmpeft.core.precision import cast_frozen

        return cast_frozen(self.backbone, frozen_dtype, self.method.name, self.method.trains_backbone)

    def disabled(self):
        """Run with the method switched off: the pristine frozen backbone (plus the head)."""
        return disabled(self.backbone)

    def add_component(self, name: str, module: nn.Module, method: Method | str | dict[str, Any] | None = None) -> None:
        """A frozen module the task uses beside the backbone (a diffusion model's text encoder), optionally
        with a method of its own (diffusers' `--train_text_encoder`). Its trained tensors go in the same
        adapter file, keyed `components.<name>.`; without a method it stays frozen and stores nothing."""
        if not hasattr(self, "components"):
            self.components = nn.ModuleDict()
            self.component_methods: dict[str, Method] = {}
        weights_identity(module)
        if method is None:
            module.requires_grad_(False)
        else:
            self.component_methods[name] = method_from_spec(method)
            self.component_methods[name].apply(module)
        self.components[name] = module

    def trainable_names(self) -> list[str]:
        """The declared trainable set, as names in this model's state dict."""
        declared = [f"backbone.{n}" for n in self.method.declared_trainable(self.backbone)]
        for name, method in getattr(self, "component_methods", {}).items():
            declared += [f"components.{name}.{n}" for n in method.declared_trainable(self.components[name])]
        if hasattr(self.head, "declared_trainable"):  # a head with frozen parts (CLIP's zero-shot head)
            return declared + [f"head.{n}" for n in self.head.declared_trainable()]
        return declared + [f"head.{n}" for n, _ in self.head.named_parameters()]

    def weights_records(self) -> dict[str, dict[str, Any]]:
        """The identity of the frozen weights the trainable set depends on, per module ("backbone", and
        "components.<name>" for components with a method): source, fingerprint of the tensors not trained in
        place, and their count (see `mmpeft.core.identity`)."""
        trained = set(self.trainable_names())
        modules = {"backbone": self.backbone}
        modules.update({f"components.{n}": self.components[n] for n in getattr(self, "component_methods", {})})
        records = {}
        for prefix, module in modules.items():
            own = {n.removeprefix(prefix + ".") for n in trained if n.startswith(prefix + ".")}
            records[prefix] = weights_identity(module).record(exclude=own)
        return records

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds: the declared trainable set, the persistent state of the method's
        pieces, and the buffers of modules that train whole (e.g. BN stats). Derived tensors
        (non-persistent buffers) are rebuilt when the method is applied and never saved."""
        names = set(self.trainable_names())
        state = self.state_dict(keep_vars=False)
        out = {n: state[n] for n in sorted(names)}
        for prefix, piece in adapter_modules(self.backbone):
            for b, _ in piece.named_buffers():  # a piece's persistent state, its submodules' included
                key = f"backbone.{prefix}.{b}"
                if key in state:
                    out[key] = state[key]
        for mod_name, module in self.named_modules():
            own = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
            if own and all(n in names for n in own):
                for b, _ in module.named_buffers(recurse=False):
                    key = f"{mod_name}.{b}" if mod_name else b
                    if key in state:
                        out[key] = state[key]
        return out

    def merge(self) -> None:
        self.method.merge(self.backbone)

    def unmerge(self) -> None:
        self.method.unmerge(self.backbone)

    def merge_and_unload(self) -> nn.Module:
        """Fold the method in and remove its pieces; returns the backbone, with exactly its own keys."""
        return self.method.merge_and_unload(self.backbone)

    def unload(self) -> nn.Module:
        """Remove the method without merging; returns the pristine backbone."""
        return self.method.unload(self.backbone)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def backbone_signature(backbone: nn.Module) -> dict[str, Any]:
    """What an adapter file must match: backbone class, name and the frozen tensors' shapes."""
    own = {prefix for prefix, _ in adapter_modules(backbone)}
    shapes = {n: list(t.shape) for n, t in backbone.state_dict().items() if not any(n.startswith(p + ".") for p in own)}
    digest = hashlib.sha1(json.dumps(sorted(shapes.items())).encode()).hexdigest()[:16]
    return {
        "class": type(backbone).__name__,
        "name": getattr(backbone, "name", type(backbone).__name__),
        "num_features": int(getattr(backbone, "num_features", 0) or 0),
        "num_tensors": len(shapes),
        "shapes_sha1": digest,
    }
