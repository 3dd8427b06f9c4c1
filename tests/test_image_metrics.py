"""Image metrics (issue 24 item 6) on random-weight models: keys, ranges, identical images score 1.0 (CLIP-I,
DINO) or 0 (FID), and a metric without weights is skipped with one line, never reported as zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft.interop.image_metrics import clip_scores, dino_score, fid_score, score_images


@pytest.fixture(scope="module")
def clip():
    import open_clip

    from mmpeft.backbones.clip import create_open_clip

    return create_open_clip("mmpeft-tiny-clip"), open_clip.get_tokenizer("mmpeft-tiny-clip")


@pytest.fixture(scope="module")
def dino():
    import timm

    return timm.create_model("test_vit", img_size=32, num_classes=0)


def _images(seed: int, n: int = 6, size: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _Pool(nn.Module):
    """A small fixed feature module (the digits quickstart scores FID in its classifier's features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # 12 features


def test_clip_scores_are_cosines_and_identical_sets_score_one(clip):
    model, tokenizer = clip
    images = _images(0)
    scores = clip_scores(model, tokenizer, images, prompts=["a photo of a dog"] * 6, references=images[:1])
    assert set(scores) == {"clip_t", "clip_i"} and -1 <= scores["clip_t"] <= 1
    same = clip_scores(model, tokenizer, images[:1].expand(3, -1, -1, -1), references=images[:1])
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_scores(model, tokenizer, images, prompts=["x"])


def test_dino_is_one_for_identical_images_and_lower_otherwise(dino):
    a = _images(1, n=2)
    assert dino_score(dino, a[:1], a[:1], size=32) == pytest.approx(1.0, abs=1e-5)
    assert dino_score(dino, a[:1], _images(9, n=3) * 0.2, size=32) < 1.0


def test_fid_is_zero_for_identical_sets_and_positive_for_different_ones():
    real = _images(2, n=40, size=16)
    assert fid_score(real, real, features=_Pool()) == pytest.approx(0.0, abs=1e-3)
    shifted = (real * 0.5 + 0.4).clamp(0, 1)
    assert fid_score(shifted, real, features=_Pool()) > 0.01
    with pytest.raises(ValueError, match="feature module or a local Inception"):
        fid_score(real, real)


def test_a_metric_without_weights_is_named_once_and_left_out(clip):
    lines: list[str] = []
    images = _images(3)
    out = score_images(images, prompts=["x"] * 6, references=images, clip=None, dino=None, log=lines.append)
    assert out == {} and len(lines) == 3
    assert "CLIP-T / CLIP-I skipped" in lines[0] and "DINO skipped" in lines[1] and "FID skipped" in lines[2]
    lines.clear()
    out = score_images(images, prompts=["x"] * 6, references=images, clip=clip, fid_features=_Pool(), log=lines.append)
    assert set(out) == {"clip_t", "clip_i", "fid"} and lines == [lines[0]] and "DINO" in lines[0]


def test_score_command_reads_a_samples_folder_and_writes_metrics_json(clip, dino, tmp_path, capsys):
    import json

    import timm
    from PIL import Image

    from mmpeft.cli import main

    samples, real = tmp_path / "samples", tmp_path / "real"
    for folder, seed in ((samples, 0), (real, 1)):
        folder.mkdir()
        for i, pixels in enumerate(_images(seed, n=3)):
            Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i:03d}-seed{i}.png")
    images = [{"file": f"{i:03d}-seed{i}.png", "seed": i, "prompt": "a dog", "class_id": None} for i in range(3)]
    (samples / "samples.json").write_text(json.dumps({"images": images}))
    torch.save(clip[0].state_dict(), tmp_path / "clip.pt")
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "dino.pth")
    args = ["score", str(samples), "--reference", str(real), "--clip", "mmpeft-tiny-clip", "--clip-weights",
            str(tmp_path / "clip.pt"), "--dino", "test_vit", "--dino-weights", str(tmp_path / "dino.pth")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    written = json.loads((samples / "metrics.json").read_text())
    assert set(written) == {"images", "clip_t", "clip_i", "dino"} and written["images"] == 3
    assert "FID skipped" in out and "fid" not in written
    assert main(["score", str(tmp_path / "nope")]) == 2
