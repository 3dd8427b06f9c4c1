"""Latent diffusion end to end on the shipped tiny SD / DiT: configs run through `mmpeft fit` and lower the
denoising loss on a fixed evaluation set; cached encoders; a text-encoder method in the same adapter file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpeft.cli import main, run_cli
from mmpeft.core.state import read_adapter
from tests.toys import write_ramp_images

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A few 64x64 images with lists as the image-list data module reads them (labels 0-1 for the DiT)."""
    return write_ramp_images(tmp_path_factory.mktemp("images"), {"train": 8, "val": 4})


def val_loss_before_and_after(config: str, images: Path, tmp_path: Path, *extra: str) -> tuple[float, float, Path]:
    args = ["-c", str(ROOT / config), f"--data.init_args.root={images}", f"--run.dir={tmp_path}", *QUICK, *extra]
    cli = run_cli(args, run=False)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    return before, after, Path(cli.trainer.log_dir)


DIFFUSION_CONFIGS = [f"configs/diffusion/{m}{s}.yaml" for m in ("difffit", "lora", "svfit") for s in ("", "_dit")]
# workflows on their own data layouts (tests/test_dreambooth.py, tests/test_image_folders.py)
WORKFLOW_CONFIGS = ["configs/diffusion/captions_lora.yaml", "configs/diffusion/difffit_dit_folders.yaml",
                    "configs/diffusion/digits_personalize.yaml",
                    *(f"configs/diffusion/dreambooth_{m}.yaml"
                      for m in ("difffit", "lora", "svfit", "efficientdm"))]  # fmt: skip
# data-free quantization (tests/test_efficientdm.py): the digits DiT at three bit-widths, the tiny UNet and DiT
DISTILLATION_CONFIGS = [f"configs/diffusion/efficientdm_{k}.yaml" for k in ("w4a4", "w4a8", "w8a8", "unet", "dit")]


def test_every_diffusion_method_has_a_tiny_sd_and_a_tiny_dit_config():
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/diffusion").glob("*.yaml"))
    assert shipped == sorted(DIFFUSION_CONFIGS + WORKFLOW_CONFIGS + DISTILLATION_CONFIGS)


@pytest.mark.parametrize("config", DIFFUSION_CONFIGS)
def test_diffusion_configs_lower_the_denoising_loss(config, images, tmp_path):
    """Each config as shipped (LoRA's 1e-4 raised to DiffFit's 1e-3 so three tiny epochs show it), on the
    fixed evaluation set: the same (image, timestep, noise) triples before and after."""
    lr = ["--model.init_args.lr=0.001"] if "lora" in config else []
    before, after, _ = val_loss_before_and_after(config, images, tmp_path, "--trainer.max_epochs=3", *lr)
    assert after < before, f"{config}: val/loss {before:.5f} -> {after:.5f}"


DIT_CONFIGS = [c for c in DIFFUSION_CONFIGS if c.endswith("_dit.yaml")]


@pytest.mark.parametrize("config", DIT_CONFIGS)
def test_dit_configs_build_without_a_tying_warning(config, images, tmp_path):
    """Issue 22 item 20: `source: tiny_dit` (the shipped config, random weights drawn by mmpeft) is tied by
    construction; it used to be checked as loaded weights, warned "kept untied", and DiffFit then said "build it
    tied". Building the run from a shipped DiT config warns about neither."""
    args = ["-c", str(ROOT / config), f"--data.init_args.root={images}", f"--run.dir={tmp_path}", *QUICK]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(args, run=False)
    tying = [str(w.message) for w in caught if "norm1.emb" in str(w.message) or "class tables" in str(w.message)]
    assert tying == [] and cli.model.model.backbone.tied


def test_mmpeft_fit_runs_the_sd_config_and_caches_the_frozen_encoders(images, tmp_path):
    assert main(["fit", "-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
                 f"--run.dir={tmp_path}", "--trainer.max_epochs=1", *QUICK]) == 0  # fmt: skip
    (summary,) = tmp_path.glob("*/version_0/summary.json")
    result = json.loads(summary.read_text())
    assert result["monitor"] == "val/loss" and result["trainable"] == 23_040
    assert (summary.parent / "diffusers_lora" / "pytorch_lora_weights.safetensors").is_file()
    cli = run_cli(["-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}", *QUICK,
                   f"--run.dir={tmp_path / 'again'}"], run=False)  # fmt: skip
    task = cli.model
    batch = (torch.rand(2, 3, 64, 64) * 2 - 1, [0, 0])
    calls = []
    encode = task.vae.encode
    task.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    for _ in range(3):
        task.encode(batch, "train")
    assert calls == [1, 1], "each image is encoded once, alone; later steps sample from the cached distribution"
    assert len(task._text_cache) == 1 and "a photo of sks dog" in task._text_cache


def test_a_text_encoder_method_is_saved_in_the_same_adapter_file(images, tmp_path):
    text = "{name: lora, r: 2, targets: [q_proj, k_proj, v_proj, out_proj]}"
    args = ["fit", "-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
            f"--run.dir={tmp_path}", "--trainer.max_epochs=1", f"--model.init_args.text_method={text}",
            *QUICK]  # fmt: skip
    assert main(args) == 0
    (adapter,) = tmp_path.glob("*/version_0/adapter.safetensors")
    tensors, header = read_adapter(adapter)
    text_keys = [k for k in tensors if k.startswith("components.text_encoder.")]
    assert text_keys and all(".lora." in k for k in text_keys)
    assert header["components"]["text_encoder"]["name"] == "lora"
    assert any(k.startswith("backbone.") for k in tensors)
    # the file given back as `adapter:` loads both parts (the text encoder's after its component exists)
    cli = run_cli([*args[1:], f"--model.init_args.adapter={adapter}", f"--run.dir={tmp_path / 'again'}"], run=False)
    loaded = cli.model.model.trainable_state_dict()
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k].cpu(), tensors[k]) for k in text_keys)


def test_export_and_import_lora_commands_round_trip_a_run_s_adapter(images, tmp_path, capsys):
    """`mmpeft export-lora` writes a run's adapter as a diffusers file, the text encoder's LoRA included (issue 22
    item 7: it used to be left in the mmpeft file only); `mmpeft import-lora` reads it back to the same UNet and
    text-encoder tensors and method configs; neither overwrites. The run's own diffusers_lora/ holds both too."""
    text = "{name: lora, r: 2, targets: [q_proj, v_proj]}"
    assert main(["fit", "-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
                 f"--run.dir={tmp_path}", "--trainer.max_epochs=1", f"--model.init_args.text_method={text}",
                 *QUICK]) == 0  # fmt: skip
    assert "diffusers LoRA file (UNet and text encoder)" in capsys.readouterr().out
    (adapter,) = tmp_path.glob("*/version_0/adapter.safetensors")
    run_file = adapter.parent / "diffusers_lora" / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in read_keys(run_file))
    exported, imported = tmp_path / "exported", tmp_path / "imported.safetensors"
    assert main(["export-lora", str(adapter), "--unet", "tiny_sd", "--out", str(exported)]) == 0
    assert "UNet and text-encoder LoRA" in capsys.readouterr().out
    assert main(["import-lora", str(exported), "--unet", "tiny_sd", "--out", str(imported)]) == 0
    assert "on 48 UNet layers; text encoder: lora r=2 alpha=None on 10 layers" in capsys.readouterr().out
    original, original_header = read_adapter(adapter)
    back, header = read_adapter(imported)
    assert back.keys() == original.keys() and any(k.startswith("components.text_encoder.") for k in back)
    assert header["method"]["config"]["r"] == 4 and header["components"] == original_header["components"]
    for key, value in original.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=1e-7)
    before = imported.read_bytes()
    assert main(["import-lora", str(exported), "--unet", "tiny_sd", "--out", str(imported)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and imported.read_bytes() == before
    unet_only = tmp_path / "unet_only.safetensors"
    assert main(["export-lora", str(adapter), "--unet", "tiny_sd", "--out", str(unet_only), "--text-encoder",
                 "ignore"]) == 0  # fmt: skip
    assert "the text_encoder part is left out (--text-encoder ignore)" in capsys.readouterr().out
    assert all(k.startswith("unet.") for k in read_keys(unet_only))


def test_a_text_method_without_a_diffusers_form_writes_no_partial_diffusers_file(images, tmp_path, capsys):
    """Issue 22 item 7: a LoRA run whose text encoder carries BitFit used to write diffusers_lora/ with the UNet's
    LoRA alone, silently; now the run writes none and warns why, and `export-lora` refuses (exit 2) unless told to
    leave the text encoder out."""
    args = ["fit", "-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
            f"--run.dir={tmp_path}", "--trainer.max_epochs=1", "--model.init_args.text_method=bitfit",
            *QUICK]  # fmt: skip
    with pytest.warns(UserWarning, match="no diffusers LoRA file written: the text_encoder carries 'bitfit'"):
        assert main(args) == 0
    (adapter,) = tmp_path.glob("*/version_0/adapter.safetensors")
    assert not (adapter.parent / "diffusers_lora").exists()
    out = tmp_path / "exported"
    assert main(["export-lora", str(adapter), "--unet", "tiny_sd", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the text_encoder carries 'bitfit', which has no diffusers LoRA form" in err and not out.exists()
    assert main(["export-lora", str(adapter), "--unet", "tiny_sd", "--out", str(out), "--text-encoder", "ignore"]) == 0


def read_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _broken_pipeline(root: Path) -> dict[str, Path]:
    """Copies of the tiny SD pipeline folder, each with one part broken (issue 22 item 17)."""
    import shutil

    from mmpeft.backbones.tiny_diffusers import tiny_sd_folder

    source, broken = tiny_sd_folder(), {}
    for case in ("vae_weights", "text_encoder_weights", "tokenizer", "scheduler", "unet_weights_are_the_vae_s"):
        folder = shutil.copytree(source, root / case)
        broken[case] = folder
    (broken["vae_weights"] / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken["text_encoder_weights"] / "text_encoder" / "model.safetensors").unlink()
    (broken["tokenizer"] / "tokenizer" / "tokenizer.json").unlink()
    (broken["scheduler"] / "scheduler" / "scheduler_config.json").unlink()
    unet = broken["unet_weights_are_the_vae_s"] / "unet"
    shutil.copy(source / "vae" / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.safetensors")
    return broken


def test_broken_diffusers_folders_exit_2_naming_the_folder(images, tmp_path, capsys):
    """Issue 22 item 17 through the CLI: a UNet config without weights used to end in "Does not validate against
    any of the Union subtypes" (exit 1), a UNet config beside a VAE's weights in "Cannot copy out of meta tensor";
    now each exits 2 with one line naming the folder and what is missing or mismatched. Likewise a pipeline
    folder whose VAE, text encoder, tokenizer or scheduler is incomplete."""
    broken = _broken_pipeline(tmp_path / "pipelines")
    no_weights = tmp_path / "unet_without_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((broken["vae_weights"] / "unet" / "config.json").read_bytes())
    base = ["fit", "-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
            f"--run.dir={tmp_path / 'runs'}", "--trainer.max_epochs=1", *QUICK]  # fmt: skip
    backbone = "--model.init_args.backbone.init_args.source="
    cases = [
        (f"{backbone}{no_weights}", f"{str(no_weights)!r} is not a complete UNet2DConditionModel (config.json and "
         "its weights) folder: expected diffusion_pytorch_model.safetensors"),
        (f"{backbone}{broken['unet_weights_are_the_vae_s'] / 'unet'}",
         f"{str(broken['unet_weights_are_the_vae_s'] / 'unet')!r}: the weights do not fit its config.json "
         "(UNet2DConditionModel): 304 of the model's tensors are not in the weights file"),
        (f"--model.init_args.pipeline={broken['vae_weights']}",
         f"{str(broken['vae_weights'] / 'vae')!r} is not a complete AutoencoderKL"),
        (f"--model.init_args.pipeline={broken['text_encoder_weights']}",
         f"{str(broken['text_encoder_weights'] / 'text_encoder')!r} is not a complete CLIPTextModel (config.json "
         "and its weights) folder: expected model.safetensors or pytorch_model.bin"),
        (f"--model.init_args.pipeline={broken['tokenizer']}",
         f"{str(broken['tokenizer'] / 'tokenizer')!r} is not a complete CLIP tokenizer folder: expected vocab.json + "
         "merges.txt or tokenizer.json"),
        (f"--model.init_args.pipeline={broken['scheduler']}",
         f"{str(broken['scheduler'] / 'scheduler')!r} is not a complete diffusers scheduler folder"),
    ]  # fmt: skip
    for arg, expected in cases:
        assert main([*base, arg]) == 2, arg
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"mmpeft: error: {expected}"), (arg, err[-1])
    assert not list((tmp_path / "runs").rglob("*.safetensors")), "nothing trained, nothing written"


def _labelled_images(root: Path, labels: list[int]) -> Path:
    """The `images` layout with these training labels (validation: label 0)."""
    (root / "img").mkdir(parents=True)
    for split, split_labels in (("train", labels), ("val", [0, 0])):
        lines = []
        for i, label in enumerate(split_labels):
            Image.new("RGB", (64, 64), (20 * i, 128, 255 - 20 * i)).save(root / "img" / f"{split}_{i}.png")
            lines.append(f"img/{split}_{i}.png {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("top", [10, 11])
def test_dit_labels_beyond_the_class_table_are_refused_before_training(top, tmp_path, capsys):
    """Issue 22 item 5: the tiny DiT has num_classes = 10 (table rows 0..9 and the null row 10). A label 10 used
    to train the null row silently, a label 11 to crash mid-training with a bare IndexError. Both stop before
    the first step (exit 2) naming num_classes and the fix; with the fix (a fresh 12-class table) it trains."""
    root = _labelled_images(tmp_path / "data", [0, 3, top, 1])
    args = ["fit", "-c", str(ROOT / "configs/diffusion/lora_dit.yaml"), f"--data.init_args.root={root}",
            f"--run.dir={tmp_path / 'runs'}", "--trainer.max_epochs=1", *QUICK]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the data has num_classes = {top + 1} (labels up to {top}), but the denoiser 'tiny_dit' has " in err
    assert "num_classes = 10: its class table holds labels 0..9, and row 10 is the classifier-free-guidance null" in err
    assert "--model.init_args.backbone.init_args.num_classes=N" in err
    assert not list((tmp_path / "runs").rglob("*.safetensors")) and not list((tmp_path / "runs").rglob("*.ckpt"))
    assert main([*args, "--model.init_args.backbone.init_args.num_classes=12"]) == 0


def test_dit_labels_are_checked_per_batch_without_a_datamodule(images, tmp_path):
    """The backstop of the setup check: loaders given to `Trainer.fit` directly; the null label 10 is refused at
    the first batch, before the optimizer steps (the trainable tensors are unchanged)."""
    from mmpeft.data.checks import DataError

    cli = run_cli(["-c", str(ROOT / "configs/diffusion/lora_dit.yaml"), f"--data.init_args.root={images}",
                   f"--run.dir={tmp_path}", "--trainer.max_epochs=1", *QUICK], run=False)  # fmt: skip
    before = {k: v.clone() for k, v in cli.model.model.trainable_state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 10, 2]))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    with pytest.raises(
        DataError, match=r"a batch holds the labels \[10\], but the denoiser 'tiny_dit' has num_classes"
    ):
        cli.trainer.fit(cli.model, train_dataloaders=loader)
    after = cli.model.model.trainable_state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_ema_with_a_text_method_validates_and_averages_the_text_encoder_too(images, tmp_path):
    """Issue 22 item 8: `ema_decay` with `text_method` used to fail at the first validation with a KeyError on the
    text encoder's keys (the EMA was made before the component was added). Now a tiny fit runs through
    validation, the average covers exactly the trainable set (text-encoder LoRA included), and the model ends
    with it (the final adapter file's weights)."""
    import pytorch_lightning as pl

    text = "{name: lora, r: 2, targets: [q_proj, v_proj]}"
    cli = run_cli(["-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
                   f"--run.dir={tmp_path}", "--trainer.max_epochs=1", f"--model.init_args.text_method={text}",
                   "--model.init_args.ema_decay=0.5", "--model.init_args.lr=0.01", *QUICK], run=False)  # fmt: skip
    task = cli.model
    start = {k: v.clone() for k, v in task.model.trainable_state_dict().items()}
    text_keys = sorted(k for k in start if k.startswith("components.text_encoder.") and k.endswith(".B"))
    assert text_keys and task.ema is None, "the average starts when the run sets up, on the complete model"
    trained: dict[str, torch.Tensor] = {}

    class LastTrained(pl.Callback):  # the live weights after the last step (validation swaps them back by then)
        def on_train_epoch_end(self, trainer, module):
            trained.update({k: v.clone() for k, v in module.model.trainable_state_dict().items()})

    cli.trainer.callbacks.append(LastTrained())
    cli.trainer.fit(task, datamodule=cli.datamodule)
    assert "val/loss" in cli.trainer.callback_metrics
    assert set(task.ema.shadow) == set(start), "the average covers exactly the trainable set"
    for key in text_keys:
        shadow = task.ema.shadow[key]
        assert not torch.equal(trained[key], start[key]) and not torch.equal(shadow, start[key])
        assert not torch.equal(shadow, trained[key]), "an average, not a copy"
        assert torch.equal(task.model.trainable_state_dict()[key], shadow), "the model ends with the EMA weights"
    with pytest.raises(RuntimeError, match="trainable set changed after its EMA was started"):
        task.ema.update(_without(task.model, text_keys[0]))


def _without(model, key: str):
    """A stand-in model whose trainable set lacks `key` (what a model changed after its EMA was made looks like)."""

    class Fewer:
        def state_dict(self, keep_vars=False):
            return model.state_dict(keep_vars=keep_vars)

        def trainable_state_dict(self):
            return {k: v for k, v in model.trainable_state_dict().items() if k != key}

    return Fewer()


def test_predict_and_a_missing_prompt_say_what_to_do_instead(images, tmp_path, capsys):
    """Issue 24: `mmpeft predict` on a diffusion run used to fail with "no 'test' split" (and would have returned noise
    predictions); `prompt: null` on a data module without captions crashed inside the tokenizer."""
    base = ["-c", str(ROOT / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images}",
            f"--run.dir={tmp_path}", *QUICK]  # fmt: skip
    assert main(["predict", *base]) == 2
    assert "mmpeft sample --run RUN_FOLDER" in capsys.readouterr().err
    assert main(["fit", *base, "--model.init_args.prompt=null", "--trainer.max_epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "prompt: null takes each image's prompt from the data" in err and "CaptionedImagesDataModule" in err
