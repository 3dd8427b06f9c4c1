"""DreamBooth-style personalization (issue 24 item 2): the instance-folder data module, prior preservation's class
images generated once by the frozen model and reused, the two-half loss, and a run end to end on the tiny SD.
(Exact `--ckpt_path` resume of a personalization run is the `dreambooth` family of `test_resume.py`.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpeft.cli import main
from mmpeft.core.state import read_adapter
from mmpeft.data.checks import DataError
from mmpeft.data.dreambooth import PROVENANCE, DreamBoothDataModule, collate_with_prior
from mmpeft.tasks.denoising import Denoising
from tests.conftest import tiny_dit

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """Three 'photos' of different sizes and aspect ratios, as users' photos are."""
    folder = tmp_path_factory.mktemp("subject")
    for i, (w, h) in enumerate([(96, 80), (70, 100), (64, 64)]):
        pixels = (np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"photo{i}.{'png' if i else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_the_data_module_reads_a_bare_folder_resizes_the_short_side_and_crops(subject, tmp_path):
    data = DreamBoothDataModule(str(subject), "a photo of sks dog", image_size=32, batch_size=2, repeats=2)
    assert [p.name for p in data.instances] == ["photo0.jpg", "photo1.png", "photo2.png"]
    images, prompts, prior = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and prompts == ["a photo of sks dog"] * 2 and not prior.any()
    assert images.min() >= -1 and images.max() <= 1
    val = next(iter(data.val_dataloader()))[0]
    with Image.open(subject / "photo0.jpg") as photo:  # 96x80: short side to 32 -> 38x32, centre crop 32x32
        resized = photo.convert("RGB").resize((38, 32), Image.BILINEAR).crop((3, 0, 35, 32))
    expected = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 127.5 - 1
    assert (val[0] - expected).abs().max() < 0.1, "short-side resize then centre crop, in [-1, 1]"


def test_a_prior_batch_puts_the_class_half_after_the_instance_half():
    items = [(torch.zeros(3, 4, 4), "inst", torch.ones(3, 4, 4), "cls")] * 2
    images, prompts, prior = collate_with_prior(items)
    assert images.shape[0] == 4 and prompts == ["inst", "inst", "cls", "cls"]
    assert prior.tolist() == [False, False, True, True] and images[2:].eq(1).all()


def test_bad_folders_and_options_are_refused_naming_the_fix(subject, tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        DreamBoothDataModule(str(tmp_path / "nope"), "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        DreamBoothDataModule(str(tmp_path / "empty"), "x")
    with pytest.raises(ValueError, match="both class_dir and class_prompt"):
        DreamBoothDataModule(str(subject), "x", class_dir=str(tmp_path / "c"))


def test_the_prior_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    task = Denoising(tiny_dit(), method="bitfit", prior_loss_weight=0.5, vlb=False)
    latents, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    prior = torch.tensor([False, False, True, True])
    inputs, targets = task.prepare_batch((latents, labels, prior), "train")
    with torch.no_grad():
        output = task.model(inputs)
    loss = task.loss_and_metrics(output, targets, "train")
    per = ((output[:, :4] - targets["target"]) ** 2).flatten(1).mean(1)
    assert loss.item() == pytest.approx((per[:2].mean() + 0.5 * per[2:].mean()).item(), rel=1e-5)
    plain_inputs, plain_targets = task.prepare_batch((latents, labels), "train")
    assert "prior" not in plain_targets
    with torch.no_grad():
        out = task.model(plain_inputs)
    assert task.loss_and_metrics(out, plain_targets, "train").item() == pytest.approx(
        F.mse_loss(out[:, :4], plain_targets["target"]).item()
    )


def _fit(subject: Path, classes: Path, run_dir: Path, *extra: str) -> int:
    return main(["fit", "-c", str(REPO / "configs/diffusion/dreambooth_lora.yaml"), *QUICK,
                 f"--data.init_args.instance_dir={subject}", f"--data.init_args.class_dir={classes}",
                 "--data.init_args.num_class_images=3", "--data.init_args.class_steps=2", "--trainer.max_epochs=1",
                 "--model.init_args.samples={every_n_steps: 0, seeds: [0, 1], steps: 2}", f"--run.dir={run_dir}",
                 *extra])  # fmt: skip


def test_personalization_end_to_end_class_images_once_from_the_frozen_model(subject, tmp_path, capsys):
    classes = tmp_path / "classes"
    assert _fit(subject, classes, tmp_path / "runs") == 0
    assert "generating 3 class images of 'a photo of dog'" in capsys.readouterr().out
    made = sorted(classes.glob("*.png"))
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    record = json.loads((classes / PROVENANCE).read_text())
    assert record["class_prompt"] == "a photo of dog" and record["model"] and record["steps"] == 2
    before = {p.name: p.read_bytes() for p in made}
    run = tmp_path / "runs" / "dreambooth-lora" / "version_0"
    tensors, _ = read_adapter(run / "adapter.safetensors")
    assert tensors and (run / "diffusers_lora" / "pytorch_lora_weights.safetensors").is_file()
    for tag in ("frozen", "final"):  # the instance prompt's grid, before and after
        assert Image.open(run / "samples" / tag / "grid.png").size == (2 * 64, 64)

    # the frozen model made them: a fresh frozen pipeline with the same seed gives the same image
    from mmpeft.backbones import DiffusersUNet
    from mmpeft.interop.sampling import build_pipeline, generate
    from mmpeft.tasks import LatentDiffusion

    frozen = LatentDiffusion(DiffusersUNet(source="tiny_sd"), method="lora", pipeline="tiny_sd").eval()
    again = generate(build_pipeline(frozen, "dpm", progress=False), [0, 1, 2], ["a photo of dog"], steps=2, size=64)
    for image in again:  # made in one call, as the task makes up to PRIOR_CHUNK of one prompt
        assert np.array_equal(np.asarray(image.image), np.asarray(Image.open(classes / f"class-0000{image.seed}.png")))

    # a second run reuses them; another class prompt is refused before training, the folder untouched
    assert _fit(subject, classes, tmp_path / "runs") == 0
    assert "generating" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in sorted(classes.glob("*.png"))} == before
    assert _fit(subject, classes, tmp_path / "runs", "--data.init_args.class_prompt=a photo of cat") == 2
    assert "made with other settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in sorted(classes.glob("*.png"))} == before


@pytest.mark.parametrize("method", ["difffit", "svfit"])
def test_personalization_runs_with_other_methods_and_logs_the_prior_loss(method, subject, tmp_path):
    import csv

    args = ["fit", "-c", str(REPO / f"configs/diffusion/dreambooth_{method}.yaml"), *QUICK,
            f"--data.init_args.instance_dir={subject}", f"--data.init_args.class_dir={tmp_path / 'classes'}",
            "--data.init_args.num_class_images=2", "--data.init_args.class_steps=1", "--trainer.max_epochs=1",
            "--model.init_args.samples=null", f"--run.dir={tmp_path}"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / f"dreambooth-{method}" / "version_0"
    tensors, header = read_adapter(run / "adapter.safetensors")
    assert tensors and header["method"]["name"] == method
    with open(run / "metrics.csv", newline="") as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    assert "train/prior_loss_epoch" in logged


def test_an_unreadable_photo_is_named_with_the_fix(subject, tmp_path):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(subject, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    data = DreamBoothDataModule(str(folder), "a photo of sks dog", image_size=16, batch_size=4)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png .*fix or remove it from the folder"):
        list(data.val_dataloader())


def test_the_personalization_configs_hold_the_values_their_comments_cite():
    """diffusers' DreamBooth (LoRA) script and README recipe, as the configs' comments cite them."""
    import yaml

    for method in ("lora", "difffit", "svfit"):
        config = yaml.safe_load((REPO / f"configs/diffusion/dreambooth_{method}.yaml").read_text())
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert model["prior_loss_weight"] == 1.0 and data["batch_size"] == 1, method  # DreamBooth's defaults
        assert model["prompt"] is None and data["center_crop"] is True and data["random_flip"] is False
    lora = yaml.safe_load((REPO / "configs/diffusion/dreambooth_lora.yaml").read_text())["model"]["init_args"]
    assert lora["method"] == {"name": "lora", "r": 4} and lora["lr"] == 1e-4  # --rank 4, the README's lr 1e-4
    captions = yaml.safe_load((REPO / "configs/diffusion/captions_lora.yaml").read_text())["model"]["init_args"]
    assert captions["lr"] == 1e-4  # train_text_to_image_lora.py's default learning rate
