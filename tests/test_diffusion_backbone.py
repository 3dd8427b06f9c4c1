"""The diffusers denoiser wrappers (`mmpeft.backbones.diffusion`): sizes, outputs equal to diffusers',
offline loading from every local layout, refusals that name the fix, raw diffusers models, dtypes.

Everything is tiny (diffusers' test configs on 8x8 latents) and offline (models saved into tmp folders).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmpeft.backbones import TINY_DIT, TINY_SD_UNET, DiffusersDiT, DiffusersUNet, create_backbone
from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import NotSupported, UnknownName, WeightsUnavailable
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules
from tests.conftest import tiny_dit, tiny_unet

BATCH, SIDE = 2, 8
TINY_UNET_PARAMS = 1_427_012  # diffusers' (32, 64) test UNet
TINY_UNET_LORA_R4 = 23_040  # diffusers' own count for LoRA r=4 on to_q, to_k, to_v, to_out.0


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _assert_same_weights(loaded: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert sorted(state) == sorted(reference)
    different = [k for k, v in reference.items() if not torch.equal(state[k], v)]
    assert not different, f"tensors differ from the saved model: {different[:5]}"


def _unet_inputs(backbone: DiffusersUNet, seed: int = 0) -> BackboneInput:
    g = torch.Generator().manual_seed(seed)
    width = backbone.model.config.cross_attention_dim
    return BackboneInput(
        x=torch.randn(BATCH, 4, SIDE, SIDE, generator=g),
        timestep=torch.tensor([10, 900]),
        cond=torch.randn(BATCH, 4, width, generator=g),
    )


# -- models saved once for the loading tests (random weights, fixed seed) ------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A pipeline folder with `unet/` and `transformer/` (safetensors), and a `.bin` copy of each."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(1234)
    unet = UNet2DConditionModel.from_config(TINY_SD_UNET)
    dit = DiTTransformer2DModel.from_config(TINY_DIT)
    unet.save_pretrained(root / "pipe" / "unet")
    dit.save_pretrained(root / "pipe" / "transformer")
    unet.save_pretrained(root / "bin" / "unet", safe_serialization=False)
    dit.save_pretrained(root / "bin" / "transformer", safe_serialization=False)
    return {
        "root": root,
        "unet": {k: v.clone() for k, v in unet.state_dict().items()},
        "dit": {k: v.clone() for k, v in dit.state_dict().items()},
    }


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before any diffusers model is built or loaded."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    def fail(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} was built although the input is refused")

    for cls in (UNet2DConditionModel, DiTTransformer2DModel):
        monkeypatch.setattr(cls, "from_config", classmethod(fail))
        monkeypatch.setattr(cls, "from_pretrained", classmethod(fail))


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1. sizes, names, frozen weights, LoRA counts ----------------------------------------------------


def test_tiny_backbones_sizes_names_and_frozen_weights():
    unet = create_backbone("tiny_sd_unet")
    assert isinstance(unet, DiffusersUNet)
    assert _count(unet) == TINY_UNET_PARAMS
    assert (unet.num_features, unet.name, unet.family) == (0, "tiny_sd_unet", "unet")
    assert not any(p.requires_grad for p in unet.parameters())
    assert unet.config is unet.model.config

    dit = create_backbone("tiny_dit")
    assert isinstance(dit, DiffusersDiT)
    assert (dit.num_features, dit.name, dit.family) == (0, "tiny_dit", "dit")
    assert _count(dit) > 0 and not any(p.requires_grad for p in dit.parameters())


def test_lora_r4_trains_diffusers_count_and_matches_peft():
    model = PeftModel(create_backbone("tiny_sd_unet"), {"name": "lora", "r": 4})
    trainable = _count(model, trainable=True)
    assert trainable == TINY_UNET_LORA_R4
    assert _count(model, trainable=False) == TINY_UNET_PARAMS
    assert {n.split(".lora.")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "to_q",
        "to_k",
        "to_v",
        "0",  # to_out.0
    }

    peft = pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(TINY_SD_UNET).requires_grad_(False)
    if not hasattr(unet, "add_adapter"):
        pytest.skip("this diffusers has no add_adapter")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert _count(unet, trainable=True) == trainable


# -- 2. outputs equal diffusers', the forward context, example batches and loss ---------------------------


def test_unet_output_equals_diffusers_and_context_is_visible():
    backbone = tiny_unet()
    inputs = _unet_inputs(backbone)
    seen = []
    backbone.model.down_blocks[1].attentions[0].register_forward_hook(
        lambda module, args, output: seen.append(backbone.context)
    )
    with torch.no_grad():
        ours = backbone(inputs)
        theirs = backbone.model(inputs.x, inputs.timestep, encoder_hidden_states=inputs.cond).sample
    assert ours.shape == (BATCH, 4, SIDE, SIDE)
    assert torch.equal(ours, theirs)
    # inside our forward a piece anywhere reads the input's timestep and cond; a direct diffusers call has none
    assert len(seen) == 2 and seen[1] is None
    assert seen[0].timestep is inputs.timestep and seen[0].cond is inputs.cond
    assert backbone.context is None  # only during a forward


def test_dit_output_equals_diffusers():
    backbone = tiny_dit()
    x = torch.randn(BATCH, 4, SIDE, SIDE)
    t, labels = torch.tensor([3, 500]), torch.tensor([1, 7])
    with torch.no_grad():
        ours = backbone(BackboneInput(x, t, labels))
        theirs = backbone.model(x, timestep=t, class_labels=labels).sample
    assert ours.shape == (BATCH, 8, SIDE, SIDE)  # learned sigma: 2 x in_channels
    assert torch.equal(ours, theirs)


def test_bare_tensor_is_refused():
    backbone = tiny_unet()
    with pytest.raises(ValueError, match="BackboneInput"):
        backbone(torch.randn(BATCH, 4, SIDE, SIDE))


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_example_batch_and_loss(build):
    backbone = build()
    g = torch.Generator().manual_seed(3)
    inputs, target = backbone.example_batch(BATCH, g)
    assert isinstance(inputs, BackboneInput)
    assert inputs.x.shape == (BATCH, 4, SIDE, SIDE) and target.shape == inputs.x.shape
    assert inputs.timestep.shape == (BATCH,) and ((inputs.timestep >= 0) & (inputs.timestep < 1000)).all()
    assert not torch.equal(inputs.x, target)  # noisy latents, not the noise itself
    again, target_again = backbone.example_batch(BATCH, torch.Generator().manual_seed(3))
    assert torch.equal(again.x, inputs.x) and torch.equal(target_again, target)
    with torch.no_grad():
        loss = backbone.example_loss(backbone(inputs), target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0


def test_unet_example_cond_is_text_states_and_dit_cond_is_labels():
    unet_inputs, _ = tiny_unet().example_batch(BATCH)
    assert unet_inputs.cond.shape == (BATCH, 4, TINY_SD_UNET["cross_attention_dim"])  # example_tokens=4
    dit_inputs, _ = tiny_dit().example_batch(BATCH)
    assert dit_inputs.cond.dtype == torch.int64 and dit_inputs.cond.shape == (BATCH,)
    assert ((dit_inputs.cond >= 0) & (dit_inputs.cond < TINY_DIT["num_embeds_ada_norm"])).all()


def test_dit_loss_ignores_learned_sigma_channels():
    backbone = tiny_dit()
    target = torch.randn(BATCH, 4, SIDE, SIDE)
    eps = torch.randn(BATCH, 4, SIDE, SIDE)
    quiet = torch.cat([eps, torch.zeros_like(eps)], 1)
    loud = torch.cat([eps, torch.full_like(eps, 1e6)], 1)
    loss = backbone.example_loss(quiet, target)
    assert torch.equal(backbone.example_loss(loud, target), loss)
    assert torch.allclose(loss, F.mse_loss(eps, target))
    # ... but the first 4 channels count
    assert not torch.equal(backbone.example_loss(torch.cat([eps + 1, eps], 1), target), loss)


# -- 3. loading from local folders and files ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "prefix", "sub", "cls"),
    [("unet", "diffusers_unet", "unet", DiffusersUNet), ("dit", "diffusers_dit", "transformer", DiffusersDiT)],
)
def test_load_from_pipeline_model_folder_and_weights_file(saved, kind, prefix, sub, cls):
    pipe = saved["root"] / "pipe"
    loaded = [
        create_backbone(f"{prefix}:{pipe}"),
        create_backbone(f"{prefix}:{pipe / sub}"),
        cls(source=str(pipe / sub / "diffusion_pytorch_model.safetensors")),
    ]
    for backbone in loaded:
        assert isinstance(backbone, cls)
        assert backbone.name.startswith(f"{prefix}:")
        assert not any(p.requires_grad for p in backbone.parameters())
        _assert_same_weights(backbone.model, saved[kind])
    assert [b.name for b in loaded] == [
        f"{prefix}:pipe",
        f"{prefix}:{sub}",
        f"{prefix}:diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize(
    ("kind", "sub", "cls"), [("unet", "unet", DiffusersUNet), ("dit", "transformer", DiffusersDiT)]
)
def test_load_bin_folder_and_file(saved, kind, sub, cls):
    folder = saved["root"] / "bin" / sub
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    _assert_same_weights(cls(source=str(folder)).model, saved[kind])
    _assert_same_weights(cls(source=str(folder / "diffusion_pytorch_model.bin")).model, saved[kind])


def test_loaded_unet_runs_like_diffusers(saved):
    backbone = create_backbone(f"diffusers_unet:{saved['root'] / 'pipe'}")
    inputs = _unet_inputs(backbone)
    with torch.no_grad():
        out = backbone(inputs)
    assert out.shape == (BATCH, 4, SIDE, SIDE) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("prefix", "sub", "params"),
    [("diffusers_unet", "unet", TINY_UNET_PARAMS), ("diffusers_dit", "transformer", None)],
)
def test_meta_device_builds_without_reading_weights(saved, monkeypatch, prefix, sub, params):
    import safetensors.torch

    def no_read(*args, **kwargs):
        raise AssertionError("weights were read for a meta build")

    monkeypatch.setattr(safetensors.torch, "load_file", no_read)
    monkeypatch.setattr(torch, "load", no_read)
    # a DiT on the meta device is tied (no values to compare; converted checkpoints have equal copies): one norm1.emb
    expected = params or sum(
        v.numel() for k, v in saved["dit"].items() if ".norm1.emb." not in k or k.startswith("transformer_blocks.0.")
    )
    for source in (saved["root"] / "pipe", saved["root"] / "pipe" / sub):
        backbone = create_backbone(f"{prefix}:{source}", device="meta")
        assert all(p.device.type == "meta" for p in backbone.parameters())
        assert _count(backbone) == expected


def test_meta_device_keeps_the_requested_dtype(saved):
    for source in (saved["root"] / "pipe", saved["root"] / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"):
        backbone = DiffusersUNet(source=str(source), device="meta", dtype="bfloat16")
        assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in backbone.parameters()} == {"meta"}


def test_legacy_dit_config_class_name_loads(saved, tmp_path):
    """Checkpoints saved before diffusers split DiT out (facebook/DiT-XL-2-*) name `Transformer2DModel`
    with `norm_type: ada_norm_zero`; diffusers itself loads them as DiTTransformer2DModel."""
    import shutil

    from diffusers import DiTTransformer2DModel

    folder = tmp_path / "legacy" / "transformer"
    shutil.copytree(saved["root"] / "pipe" / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["norm_type"] == "ada_norm_zero"
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    for source in (folder.parent, folder, folder / "diffusion_pytorch_model.safetensors"):
        backbone = DiffusersDiT(source=str(source))
        assert isinstance(backbone.model, DiTTransformer2DModel)
        _assert_same_weights(backbone.model, saved["dit"])
    # a Transformer2DModel that is not a DiT (another norm) is still refused
    (folder / "config.json").write_text(
        json.dumps({**config, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"})
    )
    with pytest.raises(NotSupported, match="Transformer2DModel, not a DiTTransformer2DModel"):
        DiffusersDiT(source=str(folder))


# -- 4. refusals ------------------------------------------------------------------------------------


def test_refuses_ckpt_file(tmp_path, no_build):
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    ckpt.write_bytes(b"not really a checkpoint")
    before = _listing(tmp_path)
    with pytest.raises(WeightsUnavailable, match=r"\.ckpt file.*single-file.*convert"):
        create_backbone(f"diffusers_unet:{ckpt}")
    with pytest.raises(WeightsUnavailable, match=r"single-file.*convert_dit_to_diffusers"):
        DiffusersDiT(source=str(ckpt))
    assert _listing(tmp_path) == before


def test_refuses_original_sd_safetensors(tmp_path, no_build):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    before = _listing(tmp_path)
    with pytest.raises(
        WeightsUnavailable,
        match=r"original-layout keys.*model\.diffusion_model\.input_blocks.*single-file.*convert.*from_single_file",
    ):
        DiffusersUNet(source=str(path))
    assert _listing(tmp_path) == before


def test_refuses_original_dit_safetensors(tmp_path, no_build):
    path = tmp_path / "DiT-XL-2-256x256.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsUnavailable, match=r"x_embedder\.proj\.weight.*single-file.*convert_dit_to_diffusers"):
        create_backbone(f"diffusers_dit:{path}")


def test_refuses_folder_without_config(tmp_path, no_build):
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    with pytest.raises(WeightsUnavailable, match=re.escape(f"expected {folder}/unet/config.json")):
        create_backbone(f"diffusers_unet:{folder}")
    with pytest.raises(WeightsUnavailable, match=re.escape(f"expected {folder}/transformer/config.json")):
        create_backbone(f"diffusers_dit:{folder}")
    # a folder holding only a single-file checkpoint says how to convert it
    (folder / "sd15.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsUnavailable, match=r"sd15\.ckpt.*single-file checkpoint.*convert"):
        create_backbone(f"diffusers_unet:{folder}")


def _broken_folders(saved, root: Path) -> tuple[Path, Path, Path]:
    """Issue 22 item 17's folders: a UNet config without weights, a UNet config beside a DiT's weights (another
    model's), and a UNet config whose weights have other shapes (another cross-attention width)."""
    import shutil

    unet = saved["root"] / "pipe" / "unet"
    folders = [root / "no_weights", root / "other_model", root / "other_shapes"]
    for folder in folders:
        folder.mkdir()
    shutil.copy(unet / "config.json", folders[0])
    shutil.copy(unet / "config.json", folders[1])
    shutil.copy(saved["root"] / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors", folders[1])
    config = json.loads((unet / "config.json").read_text())
    (folders[2] / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 16}))
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", folders[2])
    return folders[0], folders[1], folders[2]


def test_refuses_broken_model_folders_naming_the_folder_and_what_is_wrong(saved, tmp_path):
    """Issue 22 item 17: these used to fail as "Does not validate against any of the Union subtypes" (no
    weights) and "Cannot copy out of meta tensor" (another model's weights, left on the meta device)."""
    no_weights, other_model, other_shapes = _broken_folders(saved, tmp_path)
    expected = "expected diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin or "
    with pytest.raises(WeightsUnavailable, match=re.escape(f"{str(no_weights)!r} is not a complete "
                                                           f"UNet2DConditionModel (config.json and its weights) "
                                                           f"folder: {expected}")) as info:  # fmt: skip
        create_backbone(f"diffusers_unet:{no_weights}")
    assert "it holds ['config.json']" in str(info.value)
    with pytest.raises(WeightsUnavailable, match=re.escape(f"{str(other_model)!r}: the weights do not fit its "
                                                           "config.json (UNet2DConditionModel): 304 of the model's "
                                                           "tensors are not in the weights file")) as info:  # fmt: skip
        DiffusersUNet(source=str(other_model))
    assert "in the file belong to no layer of it (e.g. ['pos_embed.proj.bias'" in str(info.value)
    with pytest.raises(WeightsUnavailable, match=re.escape(f"{str(other_shapes)!r}: the weights do not fit")) as info:
        DiffusersUNet(source=str(other_shapes))
    assert "expected shape torch.Size([64, 16]), but got torch.Size([64, 32])" in str(info.value)


def test_refuses_missing_path_that_looks_like_a_hub_id(tmp_path, monkeypatch, no_build):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsUnavailable, match=r"no such file or folder: 'stabilityai/sd-x'.*hub.*download"):
        create_backbone("diffusers_unet:stabilityai/sd-x")
    with pytest.raises(WeightsUnavailable, match="no such file or folder") as info:
        create_backbone(f"diffusers_unet:{tmp_path / 'missing'}")
    assert "hub" not in str(info.value)  # an absolute path is no hub id


def test_refuses_folder_of_the_other_class(tmp_path, no_build):
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **TINY_DIT}))
    with pytest.raises(NotSupported, match="holds a DiTTransformer2DModel, not a UNet2DConditionModel"):
        DiffusersUNet(source=str(folder))


def test_refuses_empty_prefixed_name():
    with pytest.raises(UnknownName, match=re.escape("'diffusers_unet:<local folder or weights file>'")):
        create_backbone("diffusers_unet:")
    with pytest.raises(UnknownName, match="diffusers_dit"):
        create_backbone("diffusers_dit:")


def test_refuses_token_method_naming_methods_that_work():
    with pytest.raises(NotSupported, match=r"'vpt'.*not a TokenBackbone.*diffusers owns its blocks.*work.*lora"):
        PeftModel(tiny_unet(), "vpt")


def test_refuses_wrong_sources():
    with pytest.raises(ValueError, match="exactly one of"):
        DiffusersUNet()
    with pytest.raises(ValueError, match="exactly one of"):
        DiffusersUNet(config=TINY_SD_UNET, model=tiny_unet().model)
    with pytest.raises(NotSupported, match="wraps a UNet2DConditionModel, got DiTTransformer2DModel"):
        DiffusersUNet(model=tiny_dit().model)


# -- 5. raw diffusers models -------------------------------------------------------------------------


def test_raw_diffusers_unet_is_wrapped_in_place():
    from diffusers import UNet2DConditionModel

    raw = UNet2DConditionModel.from_config(TINY_SD_UNET)
    model = PeftModel(raw, "lora")
    assert isinstance(model.backbone, DiffusersUNet)
    assert model.backbone.model is raw
    assert any(True for _ in adapter_modules(raw))  # LoRA sits in the raw model itself
    assert _count(model, trainable=True) > 0
    assert not any(p.requires_grad for n, p in raw.named_parameters() if ".lora." not in n)
    inputs = _unet_inputs(model.backbone)
    out = model(inputs)
    assert out.shape == (BATCH, 4, SIDE, SIDE) and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_raw_diffusers_dit_is_wrapped():
    from diffusers import DiTTransformer2DModel

    raw = DiTTransformer2DModel.from_config(TINY_DIT)
    model = PeftModel(raw, "lora")
    assert isinstance(model.backbone, DiffusersDiT) and model.backbone.model is raw


def test_denoiser_takes_no_classification_head():
    with pytest.raises(ValueError, match="no pooled features.*num_classes=None"):
        PeftModel(tiny_unet(), "lora", num_classes=10)


# -- 6. dtypes --------------------------------------------------------------------------------------


def _lora_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora." in n}


def test_bf16_backbone_with_fp32_lora():
    backbone = DiffusersUNet(config=TINY_SD_UNET, dtype="bfloat16", example_size=SIDE, example_tokens=4)
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    model = PeftModel(backbone, "lora")
    lora = _lora_tensors(model)
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in lora} == {torch.bfloat16}

    inputs, target = backbone.example_batch(BATCH, torch.Generator().manual_seed(0))
    assert inputs.x.dtype == torch.bfloat16 and inputs.cond.dtype == torch.bfloat16
    out = model(inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    backbone.example_loss(out, target).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())

    with torch.no_grad():  # a non-zero update, so merging changes the host weights
        for n, p in lora.items():
            if n.endswith(".B"):
                p.normal_(std=0.5)
    host = backbone.model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    before = host.weight.detach().clone()
    model.merge()
    assert host.weight.dtype == torch.bfloat16 and not torch.equal(host.weight, before)
    host_dtypes = {t.dtype for n, t in model.state_dict().items() if ".lora." not in n and t.is_floating_point()}
    assert host_dtypes == {torch.bfloat16}


def test_bf16_lora_with_backbone_param_dtype():
    backbone = DiffusersUNet(config=TINY_SD_UNET, dtype="bfloat16", example_size=SIDE, example_tokens=4)
    model = PeftModel(backbone, {"name": "lora", "param_dtype": "backbone"})
    lora = _lora_tensors(model)
    assert lora and {p.dtype for p in lora.values()} == {torch.bfloat16}
    inputs, _ = backbone.example_batch(BATCH)
    with torch.no_grad():
        assert model(inputs).dtype == torch.bfloat16


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'bf16'"):
        DiffusersUNet(config=TINY_SD_UNET, dtype="bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        create_backbone("tiny_dit", dtype="half")
