"""EfficientDM (spec diffusion.md §2): which layers it quantizes, its optimizer groups, the PTQ model at init, the
step index from the context, data-free distillation, the recipe configs, and a run through the command line to
samples from the adapter and from the integer export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmpeft.core.context import BackboneInput
from mmpeft.core.model import PeftModel
from mmpeft.core.modules import adapter_modules
from mmpeft.methods.efficientdm import leading_timesteps, quantizers
from mmpeft.methods.qalora import QALoRALayer
from tests.conftest import tiny_dit, tiny_unet

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def _calibrated(make_backbone, **options) -> PeftModel:
    torch.manual_seed(0)
    model = PeftModel(make_backbone(), {"name": "efficientdm", **options})
    inputs = model.backbone.example_batch(8, torch.Generator().manual_seed(1), None)[0]
    model.method.calibrate(model.backbone, inputs, leading_timesteps(model.method.steps))
    return model


def _pieces(model: PeftModel) -> dict[str, QALoRALayer]:
    return {
        name.removesuffix(".qalora"): p for name, p in adapter_modules(model.backbone) if isinstance(p, QALoRALayer)
    }


def test_unet_layers_fp_shortcuts_and_downsamplers_eight_bit_ends_lora_elsewhere():
    model = PeftModel(tiny_unet(), {"name": "efficientdm", "rank": 4})
    pieces = _pieces(model)
    layers = {n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    fp = {n for n in layers if n.endswith("conv_shortcut") or ".downsamplers." in n}
    ends = {"model.conv_in", "model.time_embedding.linear_1", "model.time_embedding.linear_2", "model.conv_out"}
    assert fp and not fp & set(pieces), "shortcut and downsampler convs stay in floating point"
    assert set(pieces) == layers - fp
    for name, piece in pieces.items():
        if name in ends:
            assert piece.lora is None and piece.w_bits == 8 and piece.a_quant.bits == 8
            assert not list(piece.parameters()), "the 8-bit ends never train"
        else:
            assert piece.lora is not None and piece.w_bits == 4 and piece.a_quant.bits == 4
    conv = pieces["model.down_blocks.0.resnets.0.conv1"]
    assert conv.lora.A.shape[2:] == (3, 3) and conv.lora.B.shape[2:] == (1, 1), "conv A: the host's kernel; B: 1x1"
    assert all(q.num_steps == 100 for q in quantizers(model.backbone))
    assert any(n.endswith("attn1.to_q") for n in pieces), "attention projections are quantized (their matmuls not)"


def test_dit_patch_embedding_timestep_mlp_and_final_layer_stay_at_eight_bits():
    model = PeftModel(tiny_dit(), "efficientdm")
    eight = {n for n, p in _pieces(model).items() if p.lora is None}
    assert eight == {"model.pos_embed.proj", "model.transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
                     "model.transformer_blocks.0.norm1.emb.timestep_embedder.linear_2", "model.proj_out_1",
                     "model.proj_out_2"}  # fmt: skip


def test_optimizer_groups_follow_the_official_rates():
    from mmpeft.tasks.optim import param_groups

    model = PeftModel(tiny_dit(), "efficientdm")
    groups = {g["name"]: g for g in param_groups(model, model.method, 0.01, lr=0.123)}
    for name, piece in _pieces(model).items():
        if piece.lora is not None:
            group = groups[f"lora:{name}"]
            assert group["lr"] == pytest.approx(float(piece.w_quant.step.detach().mean()) / 2500)
            assert {id(p) for p in group["params"]} == {id(piece.lora.A), id(piece.lora.B)}
    assert groups["weight_steps"]["lr"] == 1e-6 and groups["activation_tables"]["lr"] == 5e-4
    grouped = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable), "every tensor in exactly one group"
    assert "decay" not in groups and all(g["lr"] != 0.123 for g in groups.values()), "the run's lr applies to none"


def test_at_init_it_is_exactly_the_ptq_model():
    """B = 0: the QALoRA model computes exactly what the same quantization without LoRA computes."""
    qalora, ptq = _calibrated(tiny_dit, rank=4), _calibrated(tiny_dit, rank=0)
    x = qalora.backbone.example_batch(4, torch.Generator().manual_seed(5), None)[0]
    x.step = 7
    with torch.no_grad():
        assert torch.equal(qalora(x), ptq(x))


def test_the_step_index_comes_from_the_context():
    model = _calibrated(tiny_dit, rank=4)
    with torch.no_grad():
        for q in quantizers(model.backbone):
            q.step[7] = q.step[3] * 1.7
    x = model.backbone.example_batch(4, torch.Generator().manual_seed(5), None)[0]

    def at(step: int) -> torch.Tensor:
        with torch.no_grad():
            return model(BackboneInput(x=x.x, timestep=x.timestep, cond=x.cond, step=step))

    assert not torch.equal(at(3), at(7)), "two calls at different steps read different entries"
    with torch.no_grad():
        for q in quantizers(model.backbone):
            q.step[7] = q.step[3]
            q.zero_point[7] = q.zero_point[3]
    assert torch.equal(at(3), at(7))


def test_an_uncalibrated_model_refuses_to_run_and_says_how_to_calibrate():
    model = PeftModel(tiny_dit(), "efficientdm")
    with pytest.raises(RuntimeError, match="calibrate"):
        model(model.backbone.example_batch(2, torch.Generator().manual_seed(0), None)[0])
    with pytest.raises(Exception, match="teacher|trajectory"):
        model.method.prepare(model.backbone, data=None)


def test_a_sampler_with_fewer_steps_reads_the_trained_table():
    model = _calibrated(tiny_dit, rank=4, steps=10)
    q = quantizers(model.backbone)[0]
    with torch.no_grad():
        q.step.copy_(torch.linspace(0.5, 1.5, 10) * q.step)
    model.method.use_schedule(model.backbone, q.timesteps[::2])
    assert torch.equal(q._entries(1)[0], q.step[2]), "the sampler's step 1 is the trained schedule's step 2"
    model.method.use_schedule(model.backbone, None)
    assert q.schedule is None


def _distillation_task(backbone=None, **method):
    from mmpeft.tasks import EfficientDMDistillation

    torch.manual_seed(0)
    spec = {"name": "efficientdm", "rank": 4, "steps": 5, **method}
    task = EfficientDMDistillation(backbone or tiny_dit(), method=spec, pipeline=None, num_train_timesteps=1000,
                                   beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # fmt: skip
    task.setup("fit")  # calibration on the teacher's own path
    return task


def _path_error(task) -> float:
    path = task.teacher_trajectory(5, 2, 0, task.eta, task.guidance_scale)
    errors = []
    with torch.no_grad():
        while path.step < path.steps:
            teacher = path.teacher(task.model)
            errors.append(F.mse_loss(path.prediction(task.model), teacher).item())
            path.advance(teacher)
    return sum(errors) / len(errors)


def test_data_free_distillation_lowers_the_error_against_the_teacher_and_leaves_the_teacher_alone():
    import pytorch_lightning as pl

    from mmpeft.backbones.digits_dit import DigitsDiT
    from mmpeft.data import TrajectoryDataModule

    # the digits DiT pretrained as the diffusion quickstart's tests have it (cached): real activation ranges, for
    # which the official rates are made (a random tiny DiT's activations are far smaller than one Adam step)
    task = _distillation_task(DigitsDiT(pretrained=True, epochs=40))
    assert task.method.calibrated(task.model.backbone)
    frozen = {n: p.clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    before = _path_error(task)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, datamodule=TrajectoryDataModule(trajectories=1, steps=5, val_trajectories=0))
    after = _path_error(task)
    assert after < 0.95 * before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in task.model.named_parameters() if n in frozen)


def test_a_path_resumed_mid_way_is_the_same_path():
    task = _distillation_task()
    walked = task.teacher_trajectory(5, 2, 3)
    walked.walk_to(task.model, 3)
    again = task._path("train", 3, 3)
    assert torch.equal(walked.x, again.x) and again.step == 3


def test_the_recipe_configs_hold_the_official_values():
    """ThisisBillhe/EfficientDM train_efficientdm.py: 160 paths x 100 DDIM steps, eta 1, guidance 1.5, 2 classes,
    rank 32, AdamW (torch's default weight decay 0.01), linear decay to 0; the three bit-widths."""
    for name, bits in (("w4a4", (4, 4)), ("w4a8", (4, 8)), ("w8a8", (8, 8))):
        config = yaml.safe_load((REPO / f"configs/diffusion/efficientdm_{name}.yaml").read_text())
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert (model["method"]["w_bits"], model["method"]["a_bits"]) == bits
        assert model["method"]["rank"] == 32 and model["method"]["steps"] == data["steps"] == 100
        assert data["trajectories"] * data["steps"] == 16_000
        assert (model["guidance_scale"], model["eta"], model["batch"]) == (1.5, 1.0, 2)
        assert model["optimizer"] == "adamw" and model["weight_decay"] == 0.01 and model["schedule"] == "linear"
    from mmpeft.core.method import create_method

    paper = create_method("efficientdm", preset="paper")
    assert (paper.w_bits, paper.a_bits, paper.rank, paper.steps, paper.calibration_samples) == (4, 4, 32, 100, 32)
    assert (paper.lora_lr_divisor, paper.weight_step_lr, paper.activation_lr) == (2500, 1e-6, 5e-4)


def test_unet_distillation_from_the_command_line_then_samples_from_the_adapter_and_the_integer_model(tmp_path):
    from mmpeft.cli import main

    runs = tmp_path / "runs"
    code = main(["fit", "-c", str(REPO / "configs/diffusion/efficientdm_unet.yaml"), *QUICK, f"--run.dir={runs}",
                 "--data.init_args.steps=4", "--data.init_args.trajectories=1",
                 "--model.init_args.method={name: efficientdm, w_bits: 4, a_bits: 8, rank: 4, steps: 4}"])  # fmt: skip
    assert code == 0
    run = next(runs.glob("**/adapter.safetensors")).parent
    assert (run / "int_model.safetensors").stat().st_size < (run / "adapter.safetensors").stat().st_size * 4
    assert main(["export", "--run", str(run), "--format", "int", "--out", str(tmp_path / "int")]) == 0
    from safetensors.torch import load_file

    written, exported = load_file(run / "int_model.safetensors"), load_file(tmp_path / "int" / "int_model.safetensors")
    assert written.keys() == exported.keys() and all(torch.equal(written[k], exported[k]) for k in written)
    common = ["--prompt", "a photo of a dog", "--steps", "2", "--guidance-scale", "1.5", "--device", "cpu"]
    assert main(["sample", "--run", str(run), *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["sample", "--run", str(run), *common, "--int-model", str(run / "int_model.safetensors"),
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    from PIL import Image

    adapter_image = torch.tensor(list(Image.open(tmp_path / "a" / "000-seed0.png").getdata())).float()
    int_image = torch.tensor(list(Image.open(tmp_path / "b" / "000-seed0.png").getdata())).float()
    assert (adapter_image - int_image).abs().mean() < 2.0, "the integer model draws the adapter's image"


def test_personalization_is_a_config_away_calibrated_on_the_teacher_for_the_instance_prompt(tmp_path):
    """`dreambooth_efficientdm.yaml`: the same quantized layers trained with the DreamBooth loss (prior preservation
    included); the tables are calibrated first on the full-precision model's own path for the instance prompt."""
    import numpy as np
    from PIL import Image

    from mmpeft.cli import main
    from mmpeft.core.state import read_adapter

    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(2):
        Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")).save(subject / f"{i}.png")
    runs = tmp_path / "runs"
    code = main(["fit", "-c", str(REPO / "configs/diffusion/dreambooth_efficientdm.yaml"), *QUICK,
                 f"--data.init_args.instance_dir={subject}", f"--data.init_args.class_dir={tmp_path / 'classes'}",
                 "--data.init_args.num_class_images=2", "--data.init_args.class_steps=2", "--trainer.max_epochs=1",
                 "--model.init_args.method={name: efficientdm, w_bits: 4, a_bits: 8, rank: 4, steps: 4}",
                 "--model.init_args.samples={every_n_steps: 0, seeds: [0], steps: 2}",
                 f"--run.dir={runs}"])  # fmt: skip
    assert code == 0
    run = next(runs.glob("**/adapter.safetensors")).parent
    tensors, header = read_adapter(run / "adapter.safetensors")
    calibrated = [v for k, v in tensors.items() if k.endswith("a_quant.calibrated")]
    assert calibrated and all(bool(v) for v in calibrated)
    assert header["method"]["name"] == "efficientdm" and (run / "int_model.safetensors").is_file()
