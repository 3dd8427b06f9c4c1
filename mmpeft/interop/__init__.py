"""Interoperability with other libraries' files and pipelines: diffusers LoRA files (the tiny offline SD pipeline
lives in `mmpeft.backbones.tiny_diffusers`; its builders are re-exported here).

Submodules import diffusers / transformers lazily, so `import mmpeft.interop` stays light.
"""

from __future__ import annotations

from mmpeft.backbones.tiny_diffusers import (
    clip_tokenizer,
    tiny_sd_components,
    tiny_sd_folder,
    tiny_sd_pipeline,
    tiny_sd_scheduler,
    tiny_sd_text_encoder,
    tiny_sd_unet,
    tiny_sd_vae,
)
from mmpeft.interop.diffusers_lora import (
    LORA_WEIGHT_NAME,
    DiffusersLoRAFile,
    diffusers_lora_state_dict,
    export_diffusers_lora,
    import_diffusers_lora,
    read_diffusers_lora,
)

__all__ = [
    "LORA_WEIGHT_NAME",
    "DiffusersLoRAFile",
    "diffusers_lora_state_dict",
    "export_diffusers_lora",
    "import_diffusers_lora",
    "read_diffusers_lora",
    "clip_tokenizer",
    "tiny_sd_components",
    "tiny_sd_folder",
    "tiny_sd_pipeline",
    "tiny_sd_scheduler",
    "tiny_sd_text_encoder",
    "tiny_sd_unet",
    "tiny_sd_vae",
]
