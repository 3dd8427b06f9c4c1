"""mmpeft LoRA <-> diffusers LoRA files (`pytorch_lora_weights.safetensors`) for Stable Diffusion: the UNet's
LoRA and, when the run adapted the text encoder too (`text_method`), the text encoder's.

Export writes what `StableDiffusionPipeline.load_lora_weights(dir)` loads and what diffusers' DreamBooth
LoRA script (`save_lora_weights`) writes; import reads those files, and also the older diffusers layouts
and kohya-ss files that diffusers itself converts, into an mmpeft `LoRA` on a `DiffusersUNet` (and a `LoRA`
on the CLIP text encoder, added as the model's `text_encoder` component).

The file format (peft keys, diffusers >= 0.2x; checked against diffusers 0.42):
  `unet.<module path>.lora_A.weight`  A, [r, in] (a Conv2d: [r, in, kh, kw], peft's k×k "down" conv)
  `unet.<module path>.lora_B.weight`  B, [out, r] (a Conv2d: [out, r, 1, 1])
  `text_encoder.text_model.<module path>.lora_A.weight` / `.lora_B.weight`: the same for the text encoder
where `<module path>` is the layer's name in the `UNet2DConditionModel` (`down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q`) or in the `CLIPTextModel` (`encoder.layers.0.self_attn.q_proj`). The text
encoder's keys carry `text_model.`, transformers 4's nesting of the CLIP text model, which the files in
circulation use; transformers 5 dropped the nesting, and diffusers 0.42 strips the prefix again when its
text encoder has none (`_load_lora_into_text_encoder`), so one spelling loads under both. With
`key_style="diffusers"` the keys go through diffusers' own `convert_state_dict_to_diffusers`, exactly as its
DreamBooth script writes them: the attention projections become `.lora.down.weight` / `.lora.up.weight` (UNet)
and `.lora_linear_layer.down.weight` / `.up.weight` (text encoder), other layers keep peft's names; diffusers
converts them back on load. Export writes through diffusers' `save_lora_weights` (its packing and file name).

Scaling: a file without alphas means `W + B A` to diffusers (peft's `lora_alpha / r` with `lora_alpha = r`
when absent), for the UNet and the text encoder alike. mmpeft's `W + (alpha / r) B A` is therefore written
with the scale folded into B (`lora_B = (alpha / r) B`), which every loader reads the same way (no reliance on
`network_alphas` or on the LoRA-config metadata newer diffusers honour). The mmpeft method configs (the
UNet's and the text encoder's) go into the safetensors header under `mmpeft_lora`, so an import of mmpeft's
own file gives back the same `alpha` and options.

On import, a module's scale is what diffusers would use: the LoRA-config metadata diffusers'
`save_lora_weights(..., unet_lora_adapter_metadata=..., text_encoder_lora_adapter_metadata=...)` writes
(`lora_alpha`, `alpha_pattern`, `rank_pattern`, `use_rslora`), else kohya `network_alphas` (`alpha / r`),
else 1.

Only LoRA has a diffusers LoRA form: a run whose text encoder carries another method (BitFit, DiffFit, ...)
is refused rather than written without it (that file would load into a pipeline that differs from the
trained model); `text_encoder="ignore"` writes the UNet part alone, and says so in the header.
"""

from mmpeft.interop.lora_export import (
    diffusers_lora_layers,
    diffusers_lora_state_dict,
    export_diffusers_lora,
    exported_components,
)
from mmpeft.interop.lora_format import KEY_STYLES, LORA_WEIGHT_NAME, METADATA_KEY, TEXT_ENCODER, TEXT_MODEL
from mmpeft.interop.lora_import import DiffusersLoRAFile, import_diffusers_lora, read_diffusers_lora

__all__ = [
    "KEY_STYLES",
    "LORA_WEIGHT_NAME",
    "METADATA_KEY",
    "TEXT_ENCODER",
    "TEXT_MODEL",
    "DiffusersLoRAFile",
    "diffusers_lora_layers",
    "diffusers_lora_state_dict",
    "export_diffusers_lora",
    "exported_components",
    "import_diffusers_lora",
    "read_diffusers_lora",
]
