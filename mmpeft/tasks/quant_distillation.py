"""Data-free distillation of a quantized denoiser from its own full-precision self (EfficientDM, He et al.,
ICLR 2024; the official `DDIMSampler_trainer` and `train_efficientdm.py`).

Each training path is one DDIM trajectory (η = 1, guidance 1.5) of the teacher — the same model with every piece
switched off (`disabled()`: no second copy of the weights). At every step the same x_t goes through the teacher and
the quantized student with the step index in the forward context; the loss is the sum-reduced squared error between
their guidance-combined ε; one optimizer step follows (one per denoising step), and the path continues with the
teacher's ε, so no image is ever needed. `val/eps_error` is the mean squared ε error against the teacher over the
steps of fixed validation paths (lower is better; the run selects on it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmpeft.tasks.latent_diffusion import LatentDiffusion

__all__ = ["EfficientDMDistillation"]


class EfficientDMDistillation(LatentDiffusion):
    """Args (beyond `LatentDiffusion`'s): `guidance_scale` and `eta` of the teacher's paths (the official 1.5
    and 1.0), `batch` (conditionings per path; the official 2 classes, each with its null copy), `prompts` (what a
    text-conditioned teacher samples; default: the task's `prompt`). Data: `TrajectoryDataModule`."""

    monitor = "val/eps_error"
    monitor_mode = "min"

    def __init__(self, *args: Any, guidance_scale: float = 1.5, eta: float = 1.0, batch: int = 2,
                 prompts: list[str] | None = None, **kwargs: Any):  # fmt: skip
        kwargs.setdefault("schedule", "linear")
        image_loss = [k for k in ("snr_gamma", "noise_offset", "input_perturbation") if kwargs.get(k)]
        if image_loss:
            raise ValueError(f"{image_loss} shape the loss of training on images; data-free distillation's loss is "
                             "the teacher's guided ε on its own path, so they would do nothing here")  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.method.name != "efficientdm":
            raise ValueError(f"data-free distillation trains an efficientdm student, not method {self.method.name!r}")
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.guidance_scale, self.eta, self.batch, self.prompts = guidance_scale, eta, batch, prompts
        self._paths: dict[str, Any] = {}

    def teacher_prompts(self, datamodule: Any = None) -> list[str]:
        return list(self.prompts) if self.prompts else super().teacher_prompts(datamodule)

    def setup(self, stage: str) -> None:
        steps = getattr(self._trainer.datamodule, "steps", None) if self._trainer is not None else None
        if steps is not None and steps != self.method.steps:
            raise ValueError(f"the data's paths have {steps} steps but the method's tables have {self.method.steps}: "
                             "set data.init_args.steps and the method's steps alike")  # fmt: skip
        super().setup(stage)

    def _path(self, stage: str, seed: int, step: int) -> Any:
        """The path `seed` at `step` (started at step 0; recomputed with the teacher after a resume)."""
        path = self._paths.get(stage)
        if path is None or path.seed != seed or path.step > step:
            path = self.teacher_trajectory(self.method.steps, self.batch, seed, self.eta, self.guidance_scale,
                                           self.teacher_prompts() if self.text_conditioned else None)  # fmt: skip
            self._paths[stage] = path
        path.walk_to(self.model, step)
        return path

    def _student_and_teacher(self, batch: Any, stage: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
        seed, step = int(batch[0][0]), int(batch[1][0])
        self.method.use_schedule(self.model.backbone, None)  # the tables' own schedule (a sampler may have set one)
        path = self._path(stage, seed, step)
        teacher = path.teacher(self.model)
        student = path.prediction(self.model)
        return path, student, teacher

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        path, student, teacher = self._student_and_teacher(batch, "train")
        loss = F.mse_loss(student.float(), teacher.float(), reduction="sum")
        self.log_epoch("eps_error", F.mse_loss(student.detach().float(), teacher.float()), 1, "train")
        self.log_epoch("loss", loss.detach(), 1, "train")
        path.advance(teacher)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        path, student, teacher = self._student_and_teacher(batch, "val")
        self.log_epoch("eps_error", F.mse_loss(student.float(), teacher.float()), 1, "val", prog_bar=True)
        path.advance(teacher)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        path, student, teacher = self._student_and_teacher(batch, "test")
        self.log_epoch("eps_error", F.mse_loss(student.float(), teacher.float()), 1, "test")
        path.advance(teacher)
