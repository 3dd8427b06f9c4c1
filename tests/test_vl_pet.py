"""VL-PET on open_clip towers: exact counts (Hu et al., VL-PET, ICCV 2023), gate shapes, inits."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
from mmpeft.core.errors import NotMergeable
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.methods.vl_pet import VLPETModule
from tests.conftest import tiny_clip


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32")


def _count(tower, **config) -> int:
    model = PeftModel(tower, create_method("vl_pet", **config), num_classes=0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("variant", "image", "text"),
    [("none", 3_559_680, 2_373_888), ("large", 7_119_360, 4_747_776), ("middle_x", 3_578_136, 2_386_200),
     ("middle_y", 3_578_112, 2_386_176), ("small", 3_596_568, 2_398_488)],
)  # fmt: skip
def test_counts_on_vit_b32(vit_b32, variant, image, text):
    assert _count(ClipImageTower(model=vit_b32), variant=variant, train_norms=False) == image
    assert _count(ClipTextTower(model=vit_b32), variant=variant, train_norms=False) == text


def test_layernorms_train_as_declared(vit_b32):
    assert _count(ClipImageTower(model=vit_b32), variant="none") - 3_559_680 == 39_936
    assert _count(ClipTextTower(model=vit_b32), variant="none") - 2_373_888 == 25_600


@pytest.mark.parametrize(("variant", "shape"), [("large", (2, 5, 16)), ("middle_x", (2, 5, 1)), ("middle_y", (16,)),
                                                ("small", (2, 1, 1))])  # fmt: skip
def test_gate_shapes_and_ranges(variant, shape):
    torch.manual_seed(0)
    module = VLPETModule(16, 8, variant, 8, 1.0, identity=False)
    x, h = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gate = module.gate_values(x, h)
    assert gate.shape == shape
    if variant != "middle_y":
        assert (gate > 0).all() and (gate < 1).all()


def test_small_gate_is_per_example_and_token_order_free():
    torch.manual_seed(0)
    module = VLPETModule(16, 8, "small", 8, 1.0, identity=False)
    x, h = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gate = module.gate_values(x, h)
    perm = torch.randperm(5)
    torch.testing.assert_close(module.gate_values(x[:, perm], h[:, perm]), gate)
    x2 = x.clone()
    x2[1] += 1
    assert torch.equal(module.gate_values(x2, h)[0], gate[0]) and not torch.equal(module.gate_values(x2, h)[1], gate[1])


def test_default_is_identity_and_paper_preset_is_not():
    torch.manual_seed(0)
    clip = tiny_clip()
    frozen = ClipImageTower(model=clip).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = frozen(x)
        default = PeftModel(ClipImageTower(model=tiny_clip_copy(clip)), "vl_pet", num_classes=0).eval()
        assert torch.equal(default(x), reference)
        paper = PeftModel(ClipImageTower(model=tiny_clip_copy(clip)), create_method("vl_pet", preset="paper"),
                          num_classes=0).eval()  # fmt: skip
        cosine = torch.nn.functional.cosine_similarity(paper(x), reference).min()
        assert cosine < 0.999
        gates = [m.gate_values(torch.randn(1, 3, 64), torch.randn(1, 3, 64)) for m in paper.modules()
                 if isinstance(m, VLPETModule)]  # fmt: skip
        assert 0.45 < torch.cat([g.flatten() for g in gates]).mean() < 0.55, "σ gates start near 0.5"
    with pytest.raises(NotMergeable):
        default.merge()


def tiny_clip_copy(clip):
    import copy

    return copy.deepcopy(clip)
