"""What mmpeft's diffusers LoRA files share between writing and reading: names, header keys, key spelling of the
text encoder, and finding the LoRA pieces and the UNet of a model (the format itself: `mmpeft.interop.diffusers_lora`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "mmpeft_lora"  # our header entry; diffusers reads only "format" and "lora_adapter_metadata"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
FORMAT = "mmpeft-diffusers-lora/1"
KEY_STYLES = ("peft", "diffusers")  # peft's lora_A / lora_B names; diffusers' converter's (DreamBooth's files)
PREFIXES = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODER = "text_encoder"  # the component name in mmpeft and the key prefix in diffusers' files
TEXT_MODEL = "text_model."  # transformers 4's CLIPTextModel nesting, as text-encoder LoRA files spell it
TEXT_MODES = ("error", "ignore", "import")


def unet_backbone(obj: Any, what: str):
    """The `DiffusersUNet` of a PeftModel / backbone / raw `UNet2DConditionModel`."""
    from mmpeft.backbones.diffusion import DiffusersUNet
    from mmpeft.core.backbone import as_backbone

    backbone = obj.backbone if isinstance(obj, PeftModel) else as_backbone(obj)
    if not isinstance(backbone, DiffusersUNet):
        raise NotSupported(
            f"{what} works on Stable Diffusion UNets (a DiffusersUNet backbone, e.g. tiny_sd_unet or "
            f"diffusers_unet:<folder>), not on {type(backbone).__name__} {getattr(backbone, 'name', '')!r}"
        )
    return backbone


def lora_pieces(root: nn.Module) -> dict[str, Any]:
    """{host module path in `root`: LoRADelta} for every mmpeft LoRA piece on `root` (a UNet, a text encoder)."""
    from mmpeft.methods.lora import LoRADelta

    pieces = {}
    for name, piece in adapter_modules(root):
        if isinstance(piece, LoRADelta):
            host, _, attr = name.rpartition(".")
            if attr != "lora":
                raise NotSupported(f"unexpected LoRA piece {name!r}: mmpeft attaches LoRA as a host's child 'lora'")
            pieces[host] = piece
    return pieces


def file_key_name(text_encoder: nn.Module, module: str) -> str:
    """A text-encoder layer's name as the file spells it (`text_model.` + its path, see the module docstring)."""
    return module if hasattr(text_encoder, "text_model") else TEXT_MODEL + module


def model_layer_name(text_encoder: nn.Module, name: str) -> str:
    """The inverse of `file_key_name`, as diffusers reads it: `text_model.` is dropped where the model has none."""
    return name if hasattr(text_encoder, "text_model") else name.removeprefix(TEXT_MODEL)
