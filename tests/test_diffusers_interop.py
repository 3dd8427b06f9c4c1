"""diffusers interop (`mmpeft.interop`, `mmpeft.backbones.diffusers_attention`): the tiny offline SD pipeline
(real CLIP token ids, diffusers' parameter counts, a cached pipeline folder), LoRA files that
`StableDiffusionPipeline.load_lora_weights` loads with outputs equal to mmpeft's, diffusers-saved files
imported back with equal outputs, and attention-processor swaps (SDPA / plain / xformers) that keep an
mmpeft LoRA active.

peft is the dev extra diffusers loads LoRA files with: it is imported unconditionally, so a missing peft
fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft  # noqa: F401 - required (see the module docstring)
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmpeft.backbones import TINY_SD_UNET, DiffusersUNet, create_backbone
from mmpeft.backbones.diffusers_attention import DispatchAttnProcessor, attention_backend, use_fast_attention
from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import AdapterMismatch, NotSupported
from mmpeft.core.model import PeftModel
from mmpeft.interop import (
    LORA_WEIGHT_NAME,
    clip_tokenizer,
    export_diffusers_lora,
    import_diffusers_lora,
    read_diffusers_lora,
    tiny_sd_folder,
    tiny_sd_pipeline,
    tiny_sd_text_encoder,
    tiny_sd_unet,
    tiny_sd_vae,
)
from mmpeft.interop.diffusers_lora import METADATA_KEY
from mmpeft.methods.lora import LoRA

TINY_UNET, TINY_VAE, TINY_TEXT = 1_427_012, 658_375, 1_617_529  # diffusers' dummy SD components
LORA_R4 = 23_040  # LoRA r=4 on to_q, to_k, to_v, to_out.0 of the tiny UNet (48 Linears)
SKS_DOG = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog" in SD 1.x's CLIP tokenizer
TOL = 1e-5


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize_b(model: torch.nn.Module, marker: str, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero B matrices (LoRA starts at B = 0, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 4, 32, generator=g)


@torch.no_grad()
def _ours(model: PeftModel) -> torch.Tensor:
    x, t, cond = _inputs()
    return model.eval()(BackboneInput(x=x, timestep=t, cond=cond))


@torch.no_grad()
def _theirs(unet: torch.nn.Module) -> torch.Tensor:
    x, t, cond = _inputs()
    return unet.eval()(x, t, encoder_hidden_states=cond).sample


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def folder() -> Path:
    """The tiny pipeline saved once in mmpeft's cache (`$MMPEFT_CACHE`, else ~/.cache/mmpeft)."""
    return tiny_sd_folder()


def _lora_model(folder: Path, **lora) -> PeftModel:
    model = PeftModel(DiffusersUNet(source=str(folder)), LoRA(**{"r": 4, "alpha": 8.0, **lora}))
    _randomize_b(model, ".lora.deltas.")
    return model


# -- the tiny pipeline ---------------------------------------------------------------------------------


def test_clip_tokenizer_has_sd_ids() -> None:
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49_408
    assert tokenizer("a photo of sks dog").input_ids == SKS_DOG
    padded = tokenizer("a photo of sks dog", padding="max_length", max_length=tokenizer.model_max_length)
    assert tokenizer.model_max_length == 77
    assert padded.input_ids == SKS_DOG + [49407] * (77 - len(SKS_DOG))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_tiny_sd_components_match_diffusers_counts() -> None:
    assert _count(tiny_sd_unet()) == TINY_UNET
    assert _count(tiny_sd_vae()) == TINY_VAE
    text = tiny_sd_text_encoder()
    assert _count(text) == TINY_TEXT
    assert (text.config.vocab_size, text.config.bos_token_id, text.config.eos_token_id) == (49_408, 49_406, 49_407)
    state = torch.random.get_rng_state()
    a, b, c = tiny_sd_unet(seed=0), tiny_sd_unet(seed=0), tiny_sd_unet(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not move the caller's random stream"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)


def test_tiny_sd_folder_is_cached_and_loads_offline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                  "scheduler"}  # fmt: skip
    assert not list(folder.parent.glob(folder.name + ".*.tmp")), "no staging folder may be left behind"
    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", lambda *a, **k: pytest.fail("rebuilt"))
    assert tiny_sd_folder() == folder  # cached: no rebuild

    backbone = create_backbone(f"diffusers_unet:{folder}")
    fresh = tiny_sd_unet()
    assert all(torch.equal(p, q) for p, q in zip(backbone.model.parameters(), fresh.parameters()))
    pipe = tiny_sd_pipeline(folder=True)
    assert pipe.tokenizer("a photo of sks dog").input_ids == SKS_DOG
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.beta_schedule == "scaled_linear"
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


# -- export: mmpeft LoRA -> pipe.load_lora_weights -----------------------------------------------------


@pytest.mark.parametrize("key_style", ["peft", "diffusers"])
def test_exported_lora_loads_in_the_pipeline_with_equal_outputs(folder: Path, tmp_path: Path, key_style: str) -> None:
    model = _lora_model(folder)
    ours = _ours(model)
    with torch.no_grad(), model.disabled():
        base = _ours(model)
    assert _max_diff(ours, base) > 1e-3, "the LoRA must change the output, or the comparison proves nothing"

    file = export_diffusers_lora(model, tmp_path, key_style=key_style)
    assert file == tmp_path / LORA_WEIGHT_NAME
    tensors = load_file(file)
    a_key, b_key = (".lora_A.weight", ".lora_B.weight") if key_style == "peft" else (".lora.down.weight",
                                                                                     ".lora.up.weight")  # fmt: skip
    assert all(k.startswith("unet.") and k.endswith((a_key, b_key)) for k in tensors)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" + a_key in tensors
    assert len(tensors) == 2 * 48 and sum(t.numel() for t in tensors.values()) == LORA_R4
    with safe_open(str(file), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["method"]["config"]["alpha"] == 8.0 and header["scale_in_B"] is True

    pipe = tiny_sd_pipeline(folder=True)
    assert _max_diff(_theirs(pipe.unet), base) < TOL  # the pipeline's UNet is the same base
    pipe.load_lora_weights(str(tmp_path))
    assert _max_diff(_theirs(pipe.unet), ours) < TOL


@pytest.mark.parametrize("key_style", ["peft", "diffusers"])
def test_export_convs_and_feed_forward(folder: Path, tmp_path: Path, key_style: str) -> None:
    model = _lora_model(folder, r=2, alpha=None, targets=("to_v", "ff.net.2", "*resnets.*.conv2"))
    if key_style == "diffusers":
        # diffusers' converter (DreamBooth's names) renames the attention projections only, and diffusers' loader
        # dropped the renamed to_v LoRA of such a mixed file: refused, nothing written
        with pytest.raises(NotSupported, match="key_style='peft'"):
            export_diffusers_lora(model, tmp_path / "lora.safetensors", key_style=key_style)
        assert not list(tmp_path.iterdir())
        return
    export_diffusers_lora(model, tmp_path / "lora.safetensors", key_style=key_style)
    pipe = tiny_sd_pipeline(folder=True)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert _max_diff(_theirs(pipe.unet), _ours(model)) < TOL
    back = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path / "lora.safetensors")
    assert back.method.targets == ("to_v", "ff.net.2", "*resnets.*.conv2")  # the file's own config, via its header
    assert _max_diff(_ours(back), _ours(model)) < TOL


def test_export_refuses_other_methods(folder: Path, tmp_path: Path) -> None:
    model = PeftModel(DiffusersUNet(source=str(folder)), "bitfit")
    with pytest.raises(NotSupported, match="writes LoRA files"):
        export_diffusers_lora(model, tmp_path)
    assert not list(tmp_path.iterdir())


# -- the text encoder's LoRA (a run with text_method) --------------------------------------------------

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_LORA_R2 = 5 * 4 * 2 * (32 + 32)  # 2,560: r = 2 on the 4 attention projections (32 x 32) of 5 layers


def _clip(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    from mmpeft.backbones.diffusers_files import load_pretrained

    return load_pretrained(CLIPTextModel, folder / "text_encoder")


def _with_text_lora(folder: Path, seed: int = 1, **lora) -> PeftModel:
    """The UNet LoRA model plus a LoRA on the text encoder (the `text_encoder` component), B's non-zero."""
    model = _lora_model(folder)
    model.add_component("text_encoder", _clip(folder), LoRA(**{"r": 2, "alpha": 4.0, "targets": TEXT_TARGETS, **lora}))
    _randomize_b(model.components["text_encoder"], ".lora.deltas.", seed)
    return model


@torch.no_grad()
def _text_states(text_encoder: torch.nn.Module) -> torch.Tensor:
    ids = clip_tokenizer()(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
    return text_encoder.eval()(ids.input_ids)[0]


@pytest.mark.parametrize("key_style", ["peft", "diffusers"])
def test_text_encoder_lora_is_exported_and_loads_with_equal_outputs(folder: Path, tmp_path: Path, key_style) -> None:
    """Issue 22 item 7: the file holds the text encoder's LoRA under diffusers' `text_encoder.text_model.` keys,
    and the pipeline with it loaded gives the trained model's UNet and text-encoder outputs (it used to hold the
    UNet part alone: the pipeline's text states then differed from the trained model's)."""
    model = _with_text_lora(folder)
    pipe = tiny_sd_pipeline(folder=True)
    ours = _text_states(model.components["text_encoder"])
    assert _max_diff(ours, _text_states(pipe.text_encoder)) > 1e-3, "the text LoRA must change the states"

    file = export_diffusers_lora(model, tmp_path, key_style=key_style)
    tensors = load_file(file)
    text = {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    a_key = ".lora_A.weight" if key_style == "peft" else ".lora_linear_layer.down.weight"  # diffusers' text keys
    assert f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj{a_key}" in text
    assert len(text) == 2 * 5 * 4 and sum(t.numel() for t in text.values()) == TEXT_LORA_R2
    assert len(tensors) - len(text) == 2 * 48
    with safe_open(str(file), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["components"]["text_encoder"]["config"]["alpha"] == 4.0 and header["left_out"] == []

    pipe.load_lora_weights(str(tmp_path))
    assert _max_diff(_text_states(pipe.text_encoder), ours) < TOL
    assert _max_diff(_theirs(pipe.unet), _ours(model)) < TOL


def test_text_encoder_lora_imports_back_into_a_text_method(folder: Path, tmp_path: Path) -> None:
    """mmpeft's file read back: the same UNet and text-encoder tensors and method configs (the text encoder's
    LoRA becomes the `text_encoder` component, the text_method of a LatentDiffusion run); without
    text_encoder='import' the text part is refused by default or left out on request."""
    model = _with_text_lora(folder, alpha=8.0, dropout=0.1)
    export_diffusers_lora(model, tmp_path)
    with pytest.raises(NotSupported, match="also adapts text_encoder.*text_encoder='import'"):
        import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path)
    with pytest.raises(NotSupported, match="pass text_model= the pipeline's CLIPTextModel"):
        import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path, text_encoder="import")
    back = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path, text_encoder="import",
                                 text_model=_clip(folder))  # fmt: skip
    text = back.component_methods["text_encoder"]
    assert text.config() == model.component_methods["text_encoder"].config()
    original, restored = model.trainable_state_dict(), back.trainable_state_dict()
    assert restored.keys() == original.keys() and any(k.startswith("components.text_encoder.") for k in original)
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=1e-6, atol=1e-7)
    assert _max_diff(_text_states(back.components["text_encoder"]), _text_states(model.components["text_encoder"])) == 0

    into = _with_text_lora(folder, seed=5, alpha=8.0, dropout=0.1)  # in place, into a model of the same layout
    assert import_diffusers_lora(into, tmp_path, text_encoder="import") is into
    assert all(torch.equal(v, into.trainable_state_dict()[k]) for k, v in restored.items())
    unet_only = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path, text_encoder="ignore")
    assert not getattr(unet_only, "component_methods", {}) and _max_diff(_ours(unet_only), _ours(model)) < TOL


@pytest.mark.parametrize("with_config", [False, True])
def test_diffusers_saved_text_encoder_lora_imports_with_equal_outputs(folder: Path, tmp_path: Path, with_config):
    """A file diffusers' `save_lora_weights` writes from peft LoRAs (keys as transformers 5 names the layers, no
    `text_model.`): without the LoRA config in the header diffusers reads alpha = r (scale 1), with it
    lora_alpha / r = 2; the import's text encoder matches the pipeline's either way."""
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model

    unet, unet_lora = _peft_unet()
    text_lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    encoder = inject_adapter_in_model(text_lora, _clip(folder))
    _randomize_b(encoder, "lora_B", seed=3)
    extra = {"unet_lora_adapter_metadata": unet_lora.to_dict(),
             "text_encoder_lora_adapter_metadata": text_lora.to_dict()} if with_config else {}  # fmt: skip
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet),
              "text_encoder_lora_layers": get_peft_model_state_dict(encoder)}  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), **layers, **extra)
    pipe = tiny_sd_pipeline(folder=True)
    pipe.load_lora_weights(str(tmp_path))
    reference = _text_states(pipe.text_encoder)
    if with_config:
        assert _max_diff(reference, _text_states(encoder)) < TOL  # diffusers honours lora_alpha = 8

    lora_file = read_diffusers_lora(tmp_path, text_encoder="import")
    assert len(lora_file.text_modules) == 10 and {s for *_, s in lora_file.text_modules.values()} == (
        {2.0} if with_config else {1.0}
    )
    model = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path, text_encoder="import",
                                  text_model=_clip(folder))  # fmt: skip
    text = model.component_methods["text_encoder"]
    assert (text.r, text.alpha, text.targets) == (4, 8.0 if with_config else None, ("q_proj", "v_proj"))
    assert _max_diff(_text_states(model.components["text_encoder"]), reference) < TOL
    assert _max_diff(_ours(model), _theirs(pipe.unet)) < TOL


def test_a_text_method_that_is_not_lora_is_refused_not_left_out(folder: Path, tmp_path: Path) -> None:
    """BitFit on the text encoder has no diffusers LoRA form: no file rather than a UNet-only one that loads into
    a pipeline unlike the trained model; `text_encoder="ignore"` writes the UNet part and records what it left."""
    model = _lora_model(folder)
    model.add_component("text_encoder", _clip(folder), "bitfit")
    with pytest.raises(NotSupported, match="the text_encoder carries 'bitfit', which has no diffusers LoRA form"):
        export_diffusers_lora(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    file = export_diffusers_lora(model, tmp_path / "unet_only", text_encoder="ignore")
    assert all(k.startswith("unet.") for k in load_file(file))
    with safe_open(str(file), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["left_out"] == ["text_encoder"]


# -- import: diffusers files -> mmpeft LoRA ------------------------------------------------------------


def test_mmpeft_file_round_trips(folder: Path, tmp_path: Path) -> None:
    model = _lora_model(folder, alpha=16.0, dropout=0.1)
    export_diffusers_lora(model, tmp_path)
    back = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path)
    assert back.method.config() == model.method.config()
    assert _max_diff(_ours(back), _ours(model)) < TOL
    same = {k: v for k, v in model.trainable_state_dict().items()}
    assert all(torch.allclose(v, back.trainable_state_dict()[k], atol=1e-6) for k, v in same.items())

    into = PeftModel(DiffusersUNet(source=str(folder)), LoRA(r=8, alpha=8.0))  # in place, a larger rank
    assert import_diffusers_lora(into, tmp_path) is into
    assert _max_diff(_ours(into), _ours(model)) < TOL


def _peft_unet(seed: int = 0, **config) -> tuple[torch.nn.Module, LoraConfig]:
    unet = tiny_sd_unet()
    lora = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian",
                         "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], **config})  # fmt: skip
    unet.add_adapter(lora)
    _randomize_b(unet, "lora_B", seed)
    return unet, lora


@pytest.mark.parametrize("with_config", [False, True])
def test_diffusers_saved_lora_imports_with_equal_outputs(folder: Path, tmp_path: Path, with_config: bool) -> None:
    """diffusers' DreamBooth script saves `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`;
    without the LoRA config in the header diffusers reads alpha = r (scale 1), with it lora_alpha / r."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet, lora = _peft_unet(rank_pattern={"attn2.to_k": 2})  # mixed ranks: 2 on the cross-attention keys
    extra = {"unet_lora_adapter_metadata": lora.to_dict()} if with_config else {}
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers, **extra)
    pipe = tiny_sd_pipeline(folder=True)
    pipe.load_lora_weights(str(tmp_path))
    reference = _theirs(pipe.unet)
    if with_config:
        assert _max_diff(reference, _theirs(unet)) < TOL  # diffusers honours lora_alpha = 8 from the header

    lora_file = read_diffusers_lora(tmp_path)
    assert set(lora_file.ranks.values()) == {2, 4} and len(lora_file.modules) == 48
    assert {s for _, _, s in lora_file.modules.values()} == ({2.0, 4.0} if with_config else {1.0})
    model = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path)
    assert model.method.r == 4 and model.method.targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert _max_diff(_ours(model), reference) < TOL


def test_kohya_file_with_alphas_imports(folder: Path, tmp_path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_kohya

    unet, _ = _peft_unet(target_modules=["to_q", "to_v"])
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(state)
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        kohya[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(8.0)  # alpha 8 on rank 4: scale 2
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    pipe = tiny_sd_pipeline(folder=True)
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    reference = _theirs(pipe.unet)
    assert _max_diff(reference, _theirs(unet)) < TOL
    model = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path / "kohya.safetensors")
    assert (model.method.r, model.method.alpha, model.method.targets) == (4, 8.0, ("to_q", "to_v"))
    assert _max_diff(_ours(model), reference) < TOL


def test_import_refusals(folder: Path, tmp_path: Path) -> None:
    model = _lora_model(folder)
    file = export_diffusers_lora(model, tmp_path)
    tensors = load_file(file)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    with pytest.raises(NotSupported, match="text_encoder='ignore'"):
        import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path / "with_te.safetensors")
    kept = import_diffusers_lora(DiffusersUNet(source=str(folder)), tmp_path / "with_te.safetensors",
                                 text_encoder="ignore")  # fmt: skip
    assert _max_diff(_ours(kept), _ours(model)) < TOL

    other = DiffusersUNet(config={**TINY_SD_UNET, "layers_per_block": 1})  # another UNet
    with pytest.raises(AdapterMismatch, match="another UNet"):
        import_diffusers_lora(other, file)
    assert getattr(other, "_mmpeft_method", None) is None, "a refused file leaves the backbone as it was"
    narrower = DiffusersUNet(config={**TINY_SD_UNET, "cross_attention_dim": 16})  # same names, other shapes
    with pytest.raises(AdapterMismatch, match="another UNet"):
        import_diffusers_lora(narrower, file)
    assert getattr(narrower, "_mmpeft_method", None) is None and not any(
        "lora" in n for n, _ in narrower.named_modules()
    )
    wrong_rank = PeftModel(DiffusersUNet(source=str(folder)), LoRA(r=2))
    with pytest.raises(AdapterMismatch, match="rank 4"):
        import_diffusers_lora(wrong_rank, file)
    with pytest.raises(NotSupported, match="LoRA model"):
        import_diffusers_lora(PeftModel(DiffusersUNet(source=str(folder)), "bitfit"), file)


# -- attention processors ------------------------------------------------------------------------------


def test_processor_swaps_keep_the_lora(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = _lora_model(folder)
    unet = model.backbone.model
    assert attention_backend(model) == "sdpa"
    sdpa = _ours(model)
    with torch.no_grad(), model.disabled():
        base = _ours(model)
    unet.set_attn_processor(AttnProcessor())
    assert attention_backend(unet) == "math"
    assert _max_diff(_ours(model), sdpa) < TOL  # the LoRA lives in the Linears: still active
    unet.set_attn_processor(AttnProcessor2_0())
    assert _max_diff(_ours(model), sdpa) < TOL and _max_diff(sdpa, base) > 1e-3

    unet.set_attn_processor(AttnProcessor())
    assert use_fast_attention(model) == "sdpa"  # CPU: never xformers
    assert attention_backend(model) == "sdpa"
    assert all(type(p) is DispatchAttnProcessor for p in unet.attn_processors.values())
    assert {getattr(p._attention_backend, "value", None) for p in unet.attn_processors.values()} == {"native"}
    assert _max_diff(_ours(model), sdpa) < TOL
    with pytest.raises(RuntimeError, match="xformers"):
        use_fast_attention(model, backend="xformers")

    # xformers usable by the probe but diffusers' own requirement check failing: SDPA stays, nothing half-switched
    import mmpeft.backbones.diffusers_attention as fast

    monkeypatch.setattr(fast, "_xformers_usable", lambda model, device: True)
    real = type(unet).set_attention_backend

    def refuse_xformers(self, backend):
        if backend == "xformers":
            raise RuntimeError("xformers_attention requires the xformers package")
        return real(self, backend)

    monkeypatch.setattr(type(unet), "set_attention_backend", refuse_xformers)
    assert use_fast_attention(model.backbone) == "sdpa" and attention_backend(unet) == "sdpa"


def test_diffusers_attention_backend_api_reaches_the_unet_and_the_dit(folder: Path) -> None:
    """Issue 23 item 6: `use_fast_attention` goes through diffusers' `set_attention_backend`. Stock processors
    have no backend slot, so mmpeft installs `DispatchAttnProcessor`; it must give what `AttnProcessor2_0`
    gives, and a backend diffusers sets must reach it (here the math kernel, the only other one on a CPU)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from tests.conftest import tiny_dit

    for name, backbone in (("unet", DiffusersUNet(source=str(folder))), ("dit", tiny_dit())):
        inner = backbone.model
        layers = [m for m in inner.modules() if isinstance(m, Attention)]
        inputs = backbone.example_batch(2, torch.Generator().manual_seed(0))[0]
        for layer in layers:
            layer.set_processor(AttnProcessor2_0())
        with torch.no_grad():
            stock = backbone.eval()(inputs)
        assert use_fast_attention(backbone) == "sdpa", name
        assert layers and all(type(m.processor) is DispatchAttnProcessor for m in layers), name
        with torch.no_grad():
            dispatched = backbone(inputs)
        assert _max_diff(dispatched, stock) < TOL, name
        inner.set_attention_backend("_native_math")  # diffusers' own API now reaches mmpeft's processors
        assert {m.processor._attention_backend.value for m in layers} == {"_native_math"}, name
        assert attention_backend(inner) == "_native_math"
        with torch.no_grad():
            assert _max_diff(backbone(inputs), stock) < TOL, name
        use_fast_attention(backbone, "sdpa")
        assert attention_backend(inner) == "sdpa", name
