"""Peer rows of `mmpeft bench`: what researchers run today without mmpeft, built by the peer library itself.

- `peft_lora`: Hugging Face peft's LoRA (r = 8, alpha = 8) injected into a token backbone's fused `attn.qkv`,
  trained with the head, through mmpeft's step (the step is the same; the layers are peft's).
- `diffusers_lora`: diffusers' DreamBooth-LoRA training step on a UNet (`examples/dreambooth/
  train_dreambooth_lora.py`): peft's LoRA added with `unet.add_adapter(LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0, add_k_proj, add_v_proj]))`, then
  per step the UNet on the noisy latents, `F.mse_loss(pred.float(), target.float())`, backward, the gradient
  clipped to norm 1.0 (the script's `max_grad_norm`), the optimizer step and `zero_grad`. Rank and targets are
  mmpeft's LoRA defaults on a UNet, so the row sits beside mmpeft's `lora` row on the same batch and latents.
  The script's per-step noise and timestep draws are left out on both sides (the bench reuses one batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import NotSupported

__all__ = ["PEERS", "DreamBoothLoraStep", "peer_layers", "peer_model", "peft_lora_model"]

PEERS = ("peft_lora", "diffusers_lora")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise NotSupported("the peer rows need Hugging Face peft: pip install peft") from err
    return peft


def peft_lora_model(backbone: nn.Module, num_classes: int | None) -> nn.Module:
    """A linear probe with peft's LoRA injected into every `qkv` linear of the backbone (the head trains too)."""
    from mmpeft.core.model import PeftModel

    peft = _peft()
    if not any(name.endswith("qkv") and isinstance(m, nn.Linear) for name, m in backbone.named_modules()):
        raise NotSupported(f"peft_lora targets a fused attn.qkv linear, which {type(backbone).__name__} has not")
    model = PeftModel(backbone, "linear", num_classes=num_classes)
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"]), model.backbone)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
    return model


class DreamBoothLoraStep(nn.Module):
    """diffusers' DreamBooth-LoRA training step on the backbone's own UNet (see the module docstring).

    `backbone` is mmpeft's `DiffusersUNet`, used only for its diffusers model and example batch: the forward
    calls the diffusers UNet directly, as the script does."""

    max_grad_norm = 1.0  # the script's --max_grad_norm default

    def __init__(self, backbone: nn.Module, rank: int, targets: tuple[str, ...]):
        super().__init__()
        peft = _peft()
        unet = getattr(backbone, "model", None)
        if type(unet).__name__ != "UNet2DConditionModel" or not hasattr(unet, "add_adapter"):
            raise NotSupported(f"diffusers_lora runs diffusers' UNet training step; {type(backbone).__name__} has none")
        # the script's list as it is; peft skips the names a UNet lacks (add_k_proj / add_v_proj on SD1.5)
        unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=list(targets)))  # fmt: skip
        self.backbone = backbone  # registers the UNet (with its LoRA layers) as this module's child
        self.trainable = [p for p in unet.parameters() if p.requires_grad]

    def forward(self, inputs: BackboneInput) -> torch.Tensor:
        return self.backbone.model(inputs.x, inputs.timestep, inputs.cond, return_dict=False)[0]

    def loss(self, inputs: BackboneInput, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(inputs).float(), target.float(), reduction="mean")

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


def peer_model(row: str, backbone: nn.Module, num_classes: int | None) -> nn.Module:
    """The peer row's model, built by the peer library on `backbone`."""
    if row == "peft_lora":
        return peft_lora_model(backbone, num_classes)
    if row == "diffusers_lora":
        from mmpeft.methods.lora import DENOISER_TARGETS, LoRA

        return DreamBoothLoraStep(backbone, LoRA().r, DENOISER_TARGETS)
    raise KeyError(row)


def peer_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers in `model` (what merges and switches off for the bare-backbone pass)."""
    return [m for m in model.modules() if type(m).__module__.startswith("peft.") and hasattr(m, "merge")]
