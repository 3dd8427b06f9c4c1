"""The tiny diffusers models every test and smoke run builds, in one place: the (32, 64) UNet and the DiT
configs, and a whole Stable Diffusion pipeline, fully offline.

The pieces are the dummy components of diffusers' own tests
(`tests/pipelines/stable_diffusion/test_stable_diffusion.py`) with random weights from a seed:
the (32, 64) UNet (`TINY_SD_UNET`, 1,427,012 parameters), the (32, 64) VAE (658,375), a 5-layer CLIP
text encoder of width 32 over the real 49,408-token CLIP vocabulary (1,617,529), SD's noise schedule
(scaled-linear betas 0.00085 -> 0.012) and the real CLIP tokenizer, built without the Hub from the BPE
file open_clip ships: "a photo of sks dog" -> [49406, 320, 1125, 539, 48136, 1929, 49407], the
ids SD 1.x sees. A 2-step 64x64 generation takes about a second on CPU.

`tiny_sd_folder()` saves the whole pipeline once as a diffusers folder (cached under
`$MMPEFT_CACHE`, else `~/.cache/mmpeft`, keyed by the configs, seed and library versions), so
`diffusers_unet:<folder>` and `StableDiffusionPipeline.from_pretrained(folder)` work offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmpeft.backbones.digits import cache_dir

__all__ = [
    "TINY_DIT",
    "TINY_SD_UNET",
    "TINY_SD_VAE",
    "TINY_SD_TEXT_ENCODER",
    "SD_SCHEDULER",
    "CLIP_VOCAB_SIZE",
    "CLIP_BOS",
    "CLIP_EOS",
    "clip_bpe_files",
    "clip_tokenizer",
    "tiny_sd_unet",
    "tiny_sd_vae",
    "tiny_sd_text_encoder",
    "tiny_sd_scheduler",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_sd_folder",
]

# The (32, 64) UNet of diffusers' SD LoRA tests: 1,427,012 parameters; LoRA r=4 on q, k, v, out: 23,040.
TINY_SD_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
}
# A mid-size SD-style UNet for benches (71,248,772 parameters, random weights): SD1.5's layout at a quarter of
# its widths (128 / 256 / 512 channels, cross-attention 256, 8-dim heads), 16 x 16 latents.
SMALL_SD_UNET: dict[str, Any] = {
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 256,
}
# diffusers' DiT pipeline test config, with 10 classes (plus the CFG null class) instead of 1000.
TINY_DIT: dict[str, Any] = {
    "sample_size": 16,
    "num_layers": 2,
    "patch_size": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "in_channels": 4,
    "out_channels": 8,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}


CLIP_VOCAB_SIZE, CLIP_BOS, CLIP_EOS = 49_408, 49_406, 49_407

# diffusers' tests/lora/test_lora_layers_sd.py VAE: 658,375 parameters; latents at 1/2 the image side.
TINY_SD_VAE: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
}
# diffusers' test text encoder (hidden 32, 5 layers, 4 heads, intermediate 37) on the real CLIP vocabulary
# and special-token ids, so real SD prompts tokenize as in SD 1.x: 1,617,529 parameters.
TINY_SD_TEXT_ENCODER: dict[str, Any] = {
    "bos_token_id": CLIP_BOS,
    "eos_token_id": CLIP_EOS,
    "pad_token_id": CLIP_EOS,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-5,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "vocab_size": CLIP_VOCAB_SIZE,
}
# Stable Diffusion's noise schedule with diffusers' DDIM test settings (DDPM takes the betas only).
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
_DDPM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample", "steps_offset")
_FOLDER_FORMAT = 1  # bump when the folder's layout or contents change


def _seeded(seed: int, build):
    """`build()` under `torch.manual_seed(seed)`, leaving the caller's random stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _bpe_merges() -> list[str]:
    """The 48,894 merges of open_clip's bundled CLIP BPE (line 0 is a header), as OpenAI's SimpleTokenizer."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def clip_bpe_files(directory: str | os.PathLike | None = None) -> Path:
    """Write CLIP's `vocab.json` (token -> id, 49,408 entries) and `merges.txt` into `directory` (default: a
    folder in mmpeft's cache, written once) and return it. Vocabulary: the 256 byte symbols, the same with
    `</w>`, each merge joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407)."""
    from open_clip.tokenizer import bytes_to_unicode

    folder = Path(directory) if directory is not None else cache_dir() / "clip_bpe"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    merges = _bpe_merges()
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE gave a vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def clip_tokenizer(directory: str | os.PathLike | None = None):
    """SD 1.x's CLIPTokenizer (77 tokens, padded with `<|endoftext|>`) from open_clip's bundled BPE, offline.

    Loaded with `from_pretrained` on the written files: with transformers 5, `CLIPTokenizer(vocab_file=,
    merges_file=)` silently builds an empty vocabulary."""
    from transformers import CLIPTokenizer

    folder = clip_bpe_files(directory)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>")


def tiny_sd_unet(seed: int = 0, **overrides: Any):
    """diffusers' (32, 64) test `UNet2DConditionModel` (`TINY_SD_UNET`), random weights from `seed`."""
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(**{**TINY_SD_UNET, **overrides}))


def tiny_sd_vae(seed: int = 0, **overrides: Any):
    """diffusers' (32, 64) test `AutoencoderKL` (`TINY_SD_VAE`), random weights from `seed`."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(**{**TINY_SD_VAE, **overrides}))


def tiny_sd_text_encoder(seed: int = 0, **overrides: Any):
    """A `CLIPTextModel` (`TINY_SD_TEXT_ENCODER`: width 32, 5 layers, the real CLIP vocabulary), from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**TINY_SD_TEXT_ENCODER, **overrides})
    return _seeded(seed, lambda: CLIPTextModel(config).eval())


def tiny_sd_scheduler(kind: str = "ddim"):
    """SD's noise schedule as a `DDIMScheduler` ("ddim", for sampling) or `DDPMScheduler` ("ddpm", for
    training noise, as diffusers' DreamBooth script)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**SD_SCHEDULER)
    if kind == "ddpm":
        return DDPMScheduler(**{k: SD_SCHEDULER[k] for k in _DDPM_KEYS})
    raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")


def tiny_sd_components(seed: int = 0, scheduler: str = "ddim") -> dict[str, Any]:
    """The keyword arguments of `StableDiffusionPipeline` for the tiny pipeline (no safety checker)."""
    return {
        "unet": tiny_sd_unet(seed),
        "vae": tiny_sd_vae(seed),
        "text_encoder": tiny_sd_text_encoder(seed),
        "tokenizer": clip_tokenizer(),
        "scheduler": tiny_sd_scheduler(scheduler),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def tiny_sd_pipeline(seed: int = 0, folder: str | os.PathLike | bool | None = None):
    """The tiny `StableDiffusionPipeline` (64x64 images from 32x32 latents).

    `folder=None` builds it in memory; `folder=True` loads the cached saved folder (`tiny_sd_folder(seed)`);
    a path loads that folder. Loading is offline (`local_files_only`)."""
    from diffusers import StableDiffusionPipeline

    if folder is None or folder is False:
        return StableDiffusionPipeline(**tiny_sd_components(seed))
    path = tiny_sd_folder(seed) if folder is True else Path(folder)
    return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)


def _folder_key(seed: int) -> str:
    import diffusers
    import transformers

    recipe = {
        "format": _FOLDER_FORMAT,
        "seed": seed,
        "unet": TINY_SD_UNET,
        "vae": TINY_SD_VAE,
        "text_encoder": TINY_SD_TEXT_ENCODER,
        "scheduler": SD_SCHEDULER,
        # random init differs between library versions, so a cached folder belongs to the versions that built it
        "versions": [torch.__version__, diffusers.__version__, transformers.__version__],
    }
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def tiny_sd_folder(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The tiny pipeline saved as a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    `tokenizer/`, `scheduler/`), built on first use and cached: `root` (default `$MMPEFT_CACHE`, else
    `~/.cache/mmpeft`) / `tiny_sd-<hash>`. The folder appears whole or not at all (built beside it, then
    renamed), so concurrent first uses are safe."""
    root = Path(root) if root is not None else cache_dir()
    folder = root / f"tiny_sd-{_folder_key(seed)}"
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import StableDiffusionPipeline

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=root))
    try:
        StableDiffusionPipeline(**tiny_sd_components(seed)).save_pretrained(str(staging))
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first (a non-empty folder is in place): keep theirs
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
