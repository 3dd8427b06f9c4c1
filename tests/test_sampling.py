"""Sampling through diffusers' pipelines (`mmpeft.interop.sampling`, `mmpeft sample`) on the tiny SD UNet and DiT:
the same seed and adapter give the same image, the method runs with the sampler's step in its context, the DiT's
guidance uses the model's own null class, and the command writes images and a grid without overwriting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.backbones import DiffusersDiT, DiffusersUNet
from mmpeft.cli import main
from mmpeft.core.state import save_adapter
from mmpeft.interop.sampling import PipelineDenoiser, build_pipeline, generate, write_images
from mmpeft.tasks import LatentDiffusion
from tests.test_core_context import StepScale, ToyStepMethod  # a toy method scaling by 1 + w * ctx.step

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


def _sd(method="lora", **kwargs) -> LatentDiffusion:
    return LatentDiffusion(DiffusersUNet(source="tiny_sd"), method=method, pipeline="tiny_sd", prompt=PROMPT, **kwargs)


def _dit(method="difffit") -> LatentDiffusion:
    return LatentDiffusion(DiffusersDiT(source="tiny_dit"), method=method, pipeline="tiny_sd")


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(item.image) for item in images]


def _randomize(task: LatentDiffusion, seed: int = 3) -> None:
    """Non-zero LoRA B matrices: an untrained LoRA is the identity and would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            if p.requires_grad and "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_same_seed_and_adapter_give_the_same_image_and_the_adapter_changes_it(tmp_path):
    trained = _sd().eval()
    _randomize(trained)
    save_adapter(trained.model, tmp_path / "adapter.safetensors")
    reloaded = _sd(adapter=str(tmp_path / "adapter.safetensors")).eval()
    frozen = _sd().eval()
    run = lambda task, seeds: _pixels(generate(build_pipeline(task, "ddim", progress=False), seeds, [PROMPT], steps=2))
    a, b, c = run(trained, [0, 1]), run(reloaded, [1, 0]), run(frozen, [0])
    assert np.array_equal(a[0], b[1]) and np.array_equal(a[1], b[0]), "the same seed and adapter: the same image"
    assert not np.array_equal(a[0], a[1]), "another seed, another image"
    assert not np.array_equal(a[0], c[0]), "the adapter is live in the pipeline"


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_the_method_runs_with_the_sampler_step_in_its_context(kind, scheduler):
    task = (_sd if kind == "unet" else _dit)(ToyStepMethod()).eval()
    pieces = [m for m in task.model.modules() if isinstance(m, StepScale)]
    assert pieces
    pipe = build_pipeline(task, scheduler, progress=False)
    cond = {"prompts": [PROMPT]} if kind == "unet" else {"class_ids": [2]}
    scaled = _pixels(generate(pipe, [0], steps=3, guidance_scale=3.0, **cond))
    steps = [ctx.step for ctx in pieces[0].seen]
    assert steps == [0, 1, 2], "one forward per step (guidance batches both halves), indexed by the scheduler"
    assert all(ctx.timestep is not None and ctx.cond is not None for ctx in pieces[0].seen)
    with torch.no_grad():
        for piece in pieces:
            piece.w.zero_()  # the toy method now ignores the step
    assert not np.array_equal(scaled[0], _pixels(generate(pipe, [0], steps=3, guidance_scale=3.0, **cond))[0])


def test_dit_guidance_uses_the_model_s_null_class_and_its_learned_sigma_is_dropped_by_ddim():
    task = _dit().eval()
    inner = task.model.backbone.model
    seen: list[torch.Tensor] = []
    inner.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    images = generate(build_pipeline(task, "ddim", progress=False), [0, 1], class_ids=[4], steps=2, guidance_scale=4.0)
    null = inner.config.num_embeds_ada_norm  # 10 for the tiny DiT: not DiTPipeline's hard-coded 1000
    assert [t.tolist() for t in seen[:2]] == [[4, 4, null, null]] * 2, "both seeds in one batch, then the null class"
    assert len(images) == 2 and images[0].image.size == (32, 32) and images[0].class_id == 4


def test_generate_refuses_the_wrong_conditioning():
    pipe = build_pipeline(_dit().eval(), "ddim", progress=False)
    with pytest.raises(ValueError, match="conditioned on class ids"):
        generate(pipe, [0], prompts=["a dog"])
    with pytest.raises(ValueError, match="one of them"):
        generate(pipe, [0])
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        build_pipeline(_dit(), "nope")


def test_pipeline_denoiser_refuses_a_model_that_is_no_diffusers_denoiser():
    from mmpeft.backbones import TimmViT
    from mmpeft.core.errors import NotSupported
    from mmpeft.core.model import PeftModel

    with pytest.raises(NotSupported, match="diffusers denoiser"):
        PipelineDenoiser(PeftModel(TimmViT("test_vit", img_size=32), "lora", num_classes=3))


def test_grid_has_a_row_per_prompt_and_a_column_per_seed(tmp_path):
    from mmpeft.interop.sampling import GeneratedImage

    tiles = [GeneratedImage(Image.new("RGB", (8, 8), (i * 40, 0, 0)), seed, prompt=p)
             for i, (p, seed) in enumerate((p, s) for p in "ab" for s in (0, 1, 2))]  # fmt: skip
    grid = write_images(tiles, tmp_path)
    assert Image.open(grid).size == (3 * 8, 2 * 8)
    assert sorted(f.name for f in tmp_path.glob("0*.png")) == [f"{i:03d}-seed{i % 3}.png" for i in range(6)]


def test_sample_command_writes_images_a_grid_and_a_record_and_never_overwrites(tmp_path, capsys):
    config = str(REPO / "configs/diffusion/lora.yaml")
    trained = _sd({"name": "lora", "r": 4}).eval()
    _randomize(trained)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(trained.model, adapter)
    out = tmp_path / "samples"
    argv = ["sample", "-c", config, "--adapter", str(adapter), "--prompt", PROMPT, "--prompt", "a dog",
            "--seeds", "0,1", "--steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)
    record = json.loads((out / "samples.json").read_text())
    assert record["adapter"] == str(adapter) and record["seeds"] == [0, 1] and len(record["images"]) == 4
    first = np.asarray(Image.open(out / "000-seed0.png"))
    expected = _pixels(generate(build_pipeline(trained, "ddim", progress=False), [0], [PROMPT], steps=2))[0]
    assert np.array_equal(first, expected), "the command's image is the API's: same config, adapter and seed"

    before = (out / "grid.png").read_bytes()
    assert main(argv) == 2
    assert "holds images already; pass --overwrite" in capsys.readouterr().err
    assert (out / "grid.png").read_bytes() == before
    assert main(["sample", "--run", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["sample", "-c", config, "--prompt", "x", "--class-ids", "1"]) == 2
    assert "one of them" in capsys.readouterr().err


def test_a_learned_sigma_dit_samples_with_its_own_variance_under_ddpm_learned():
    task = _dit().eval()
    inner = task.model.backbone.model
    assert inner.config.out_channels == 2 * inner.config.in_channels, "the tiny DiT learns Σ"
    pipe = build_pipeline(task, "ddpm_learned", progress=False)
    assert pipe.scheduler.config.variance_type == "learned_range"
    learned = _pixels(generate(pipe, [0], class_ids=[1], steps=3, guidance_scale=1.0))[0]
    fixed = _pixels(generate(build_pipeline(task, "ddpm", progress=False), [0], class_ids=[1], steps=3,
                             guidance_scale=1.0))[0]  # fmt: skip
    assert not np.array_equal(learned, fixed), "the learned variance reaches the scheduler's step"


def _fit_with_samples(images_root: Path, run_dir: Path, samples: str | None) -> Path:
    args = ["fit", "-c", str(REPO / "configs/diffusion/lora.yaml"), f"--data.init_args.root={images_root}",
            "--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false",
            "--trainer.max_epochs=1", "--model.init_args.lr=0.01", f"--run.dir={run_dir}", "--run.name=r"]  # fmt: skip
    if samples is not None:
        args.append(f"--model.init_args.samples={samples}")
    assert main(args) == 0
    return run_dir / "r" / "version_0"


def test_sample_grids_of_the_frozen_model_every_n_steps_and_at_the_end_leave_training_untouched(tmp_path):
    from mmpeft.core.state import read_adapter
    from tests.toys import write_ramp_images

    images = write_ramp_images(tmp_path / "images", {"train": 8, "val": 4})  # 2 steps of 4
    run = _fit_with_samples(images, tmp_path / "with", "{every_n_steps: 1, seeds: [0, 1], steps: 2}")
    grids = sorted(str(p.relative_to(run / "samples")) for p in (run / "samples").glob("*/grid.png"))
    assert grids == ["final/grid.png", "frozen/grid.png", "step-000001/grid.png", "step-000002/grid.png"]
    assert Image.open(run / "samples" / "final" / "grid.png").size == (2 * 64, 64), "a column per seed"
    frozen = np.asarray(Image.open(run / "samples" / "frozen" / "000-seed0.png"))
    final = np.asarray(Image.open(run / "samples" / "final" / "000-seed0.png"))
    assert not np.array_equal(frozen, final), "the trained adapter changes the samples"
    fresh = _sd({"name": "lora", "r": 4}).eval()
    again = _pixels(generate(build_pipeline(fresh, "dpm", progress=False), [0], [PROMPT], steps=2))[0]
    assert np.array_equal(frozen, again), "the frozen grid is the model with its method switched off"
    plain = _fit_with_samples(images, tmp_path / "without", None)
    ours, _ = read_adapter(run / "adapter.safetensors")
    theirs, _ = read_adapter(plain / "adapter.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "sampling draws nothing from the training RNG"
    assert not (plain / "samples").exists()


def test_sample_grids_go_to_loggers_that_take_images(tmp_path):
    from mmpeft.tasks.sample_grids import SampleGrids

    class ImageLogger:
        def __init__(self):
            self.calls, self.log_dir = [], str(tmp_path)

        def log_image(self, **kwargs):
            self.calls.append(kwargs)

    logger = ImageLogger()
    trainer = type("Trainer", (), {"loggers": [logger], "global_step": 7, "default_root_dir": str(tmp_path)})()
    grids = SampleGrids(class_ids=[1, 2], seeds=[0], steps=2)
    grids.write(trainer, _dit().eval(), "step-000007")
    (call,) = logger.calls
    assert call["key"] == "samples/model" and call["step"] == 7 and call["caption"] == ["step-000007: 1, 2"]
    assert (tmp_path / "samples" / "step-000007" / "grid.png").is_file()
    with pytest.raises(ValueError, match="unknown scheduler"):
        SampleGrids(scheduler="nope")
