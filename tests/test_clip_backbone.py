"""open_clip towers in the token anatomy: equal outputs, open_clip's own keys, prompts on the text tower."""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
from mmpeft.core.errors import NotSupported, WeightsUnavailable
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from tests.conftest import tiny_clip

ANY_BACKBONE = "bitfit, difffit, full, linear, lora, ssf, svfit"  # the methods that need no token anatomy


def ids(batch=3, seed=0):
    """Token ids laid out as open_clip's tokenizer does (the text tower's own example inputs)."""
    return ClipTextTower(model=tiny_clip()).example_inputs(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_towers_match_open_clip(seed):
    torch.manual_seed(seed)
    model = tiny_clip()
    image, text = ClipImageTower(model=model).eval(), ClipTextTower(model=model).eval()
    x, t = torch.randn(2, 3, 32, 32), ids(seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(image(x), model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(text(t), model.encode_text(t), atol=1e-5, rtol=0)


def test_full_size_vit_b32_converts():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    image, text = ClipImageTower(model=model).eval(), ClipTextTower(model=model).eval()
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog.", "a diagram"])
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(image(x), model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
    assert image.num_features == text.num_features == 512 and image.embed_dim == 768


def test_state_dicts_round_trip_through_open_clip_keys():
    torch.manual_seed(0)
    source = tiny_clip()
    image, text = ClipImageTower(model=source), ClipTextTower(model=source)
    visual = source.visual.state_dict()
    assert image.open_clip_state_dict().keys() == visual.keys()
    assert all(torch.equal(image.open_clip_state_dict()[k], v) for k, v in visual.items())
    root = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.") and k != "logit_scale"}
    assert text.open_clip_state_dict().keys() == root.keys()
    torch.manual_seed(1)
    target = tiny_clip()
    image2, text2 = ClipImageTower(model=target).eval(), ClipTextTower(model=target).eval()
    image2.load_open_clip_state_dict(visual)
    text2.load_open_clip_state_dict(root)
    x, t = torch.randn(2, 3, 32, 32), ids()
    with torch.no_grad():
        assert torch.equal(image2(x), image.eval()(x)) and torch.equal(text2(t), text.eval()(t))
    with pytest.raises(KeyError, match="does not fit"):
        image2.load_open_clip_state_dict(root)


def test_local_checkpoint_through_a_registered_config(tmp_path):
    config = {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8,
              "image_size": 32}, "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4,
              "layers": 2}}  # fmt: skip
    (tmp_path / "test-tiny-clip-vocab100.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "test-tiny-clip-vocab100.json")
    torch.manual_seed(3)
    source = open_clip.create_model("test-tiny-clip-vocab100").eval()
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    tower = ClipImageTower("test-tiny-clip-vocab100", weights=str(tmp_path / "clip.pt")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), source.encode_image(x), atol=1e-5, rtol=0)


def test_unsupported_families_and_offline_tags():
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=1)
    resnet = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=32), text_cfg=text)
    with pytest.raises(NotSupported, match=f"ModifiedResNet is not a ViT.*{ANY_BACKBONE}"):
        ClipImageTower(model=resnet)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="ViT-B-32/openai.*offline"):
        ClipImageTower("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - start < 10
    with pytest.raises(NotSupported, match="open_clip has no model"):
        ClipTextTower("ViT-B-99")


def test_vpt_on_the_text_tower_keeps_the_causal_mask_and_eot_pooling():
    torch.manual_seed(0)
    tower = ClipTextTower(model=tiny_clip())
    model = PeftModel(tower, create_method("vpt", length=4), num_classes=0).eval()
    t = ids()
    x, ctx = tower.forward_tokens(t)
    assert ctx.layout["prompts"] == slice(1, 5), "prompts go right after the start token"
    assert torch.equal(ctx.pool_index, t.argmax(-1) + 4)
    assert torch.equal(model(t), tower.pool(x, ctx))
    changed = t.clone()
    row, eot = 0, int(t[0].argmax())
    changed[row, eot + 1] = 7  # a token after the EOT: invisible to it under the causal mask
    with torch.no_grad():
        assert torch.equal(model(changed)[row], model(t)[row])
        changed[row, 1] = 7 if t[row, 1] != 7 else 8  # a token before it changes the feature
        assert not torch.equal(model(changed)[row], model(t)[row])


def test_params_table_on_an_open_clip_name_builds_on_meta():
    from mmpeft.cli import params_table

    rows = {r["method"]: r for r in params_table("open_clip:ViT-B-32:image", num_classes=10)}
    assert rows["vl_pet"]["no head"] == 7_119_360 + 39_936  # Hu et al., VL-PET, ICCV 2023
    assert rows["full"]["no head"] == 87_849_216, "ViT-B/32's visual tower"
    assert rows["linear"]["trainable"] == 513 * 10


def test_hugging_face_text_towers_are_refused():
    """CustomTextCLIP keeps its text tower under `model.text` (an HF encoder): no `token_embedding`."""
    custom = torch.nn.Module()
    custom.text = torch.nn.Identity()
    with pytest.raises(NotSupported, match=f"Hugging Face text tower.*{ANY_BACKBONE}"):
        ClipTextTower(model=custom)
