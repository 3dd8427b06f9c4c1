"""EfficientDM (He et al., "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models",
ICLR 2024, arXiv 2310.03270; code ThisisBillhe/EfficientDM, `quant_scripts/`): a diffusion denoiser quantized
(weights per output channel, layer inputs per tensor with one range per denoising step) and fine-tuned through
QALoRA layers (`mmpeft.methods.qalora`), then distilled from its own full-precision self without data.

Named `efficientdm` everywhere: "QA-LoRA" (Xu et al. 2023) is another method, for LLMs.

Which layers (the official `QuantModel_intnlora`, mapped onto diffusers' names):
- every `nn.Linear` / `nn.Conv2d` of the denoiser is quantized, except ResNet shortcut convs (`conv_shortcut`, the
  official `skip`) and downsampler convs (the official `op`), which stay in floating point;
- the first and last layers stay at 8 bits (weights and inputs) without LoRA and never train: `conv_in`,
  `time_embedding.linear_1/2`, `conv_out` on a UNet; on a DiT the patch embedding, the timestep MLP (the UNet's
  time embedding; diffusers' DiT shares one across its blocks) and the final layer (`proj_out_1/2`);
- attention matmuls, softmax, norms and activations stay in floating point (only conv / linear inputs and
  weights are quantized).

Optimizer groups (`param_groups`, the official `train_efficientdm.py`): one group per LoRA layer at
lr = mean(s_w) / 2500 (the paper's scale-aware LoRA optimization, Eq. 8: under Adam a gradient multiplier is
normalised away, so the per-layer rate is the form that acts), the weight steps at 1e-6 and the activation tables
at 5e-4. The run's `lr` applies to nothing of EfficientDM's own.

Calibration (`calibrate`): one forward of a batch drawn from the full-precision model's own sampling trajectory
(the official naive PTQ: its first forward on 32 saved (x_t, t, y) inputs), every activation quantizer initialised
by the L_p (p = 2.4) search on its input in turn, earlier layers already quantized; every table entry starts from
that value. A run calibrates in `prepare` from the task's teacher trajectory (`mmpeft.tasks.trajectory`);
a loaded adapter file carries its tables.

Not mergeable in mmpeft's sense (folding into float weights and dropping the pieces): the activation quantizers
are part of the trained function. Its deployable form is the integer export (`mmpeft.interop.int_export`): B A
folded into the integers once, quantized once, no floating-point side branch.

Deviation, named: the official activation tables are indexed by an internal counter of forward calls (one per
denoising step, guidance batched); here by the sampler's step index in the forward context, so guidance may run
batched or as two calls, and a sampler with another schedule reads the trained table through `use_schedule`
("interpolate" by default, as the paper describes; "stride", the released code's every k-th entry).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mmpeft.core.context import BackboneInput
from mmpeft.core.errors import NotSupported
from mmpeft.core.inject import attach
from mmpeft.core.method import Method, register_method
from mmpeft.core.modules import adapter_modules
from mmpeft.core.quant import RESAMPLE_MODES, ActivationQuantizer
from mmpeft.methods.qalora import QALoRALayer

__all__ = ["EfficientDM", "KEEP_FP", "KEEP_8BIT", "quantizers", "leading_timesteps"]

# module-name patterns (fnmatch, on names inside the backbone) per denoiser family
KEEP_FP = {"unet": ("*conv_shortcut", "*downsamplers.*.conv"), "dit": ()}
KEEP_8BIT = {
    "unet": ("*conv_in", "*time_embedding.linear_1", "*time_embedding.linear_2", "*conv_out"),
    "dit": ("*pos_embed.proj", "*timestep_embedder.linear_1", "*timestep_embedder.linear_2", "*proj_out_1",
            "*proj_out_2"),
}  # fmt: skip


def leading_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIM's "leading" schedule of `steps` steps, in sampling order (990, 980, ..., 0 for 100 of 1000)."""
    return torch.arange(steps - 1, -1, -1) * (num_train_timesteps // steps)


def quantizers(backbone: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of the QALoRA layers in `backbone`, in module order."""
    return [piece.a_quant for _, piece in adapter_modules(backbone) if isinstance(piece, QALoRALayer)]


@register_method
@dataclass
class EfficientDM(Method):
    """EfficientDM's quantization-aware LoRA on a diffusion denoiser (see the module docstring): W`w_bits`A`a_bits`
    with rank-`rank` LoRA inside the weight quantizer, one activation range per step of a `steps`-step schedule.
    The default is the paper's W4A4 recipe; presets `w8a8`, `w4a8`, `w4a4` (= `paper`)."""

    name: ClassVar[str] = "efficientdm"
    identity_at_init: ClassVar[bool] = False  # the PTQ model, exactly (QALoRA adds nothing at init)
    mergeable: ClassVar[bool] = False
    needs_denoiser: ClassVar[bool] = True
    frozen_mode: ClassVar[str] = "eval"  # the official student runs in eval mode (no label dropout while distilling)
    presets: ClassVar[dict] = {
        "paper": {"w_bits": 4, "a_bits": 4, "rank": 32, "steps": 100},
        "w4a4": {"w_bits": 4, "a_bits": 4},
        "w4a8": {"w_bits": 4, "a_bits": 8},
        "w8a8": {"w_bits": 8, "a_bits": 8},
    }

    w_bits: int = field(default=4, metadata={"help": "weight bits (per output channel, integers 0..2^b-1)"})
    a_bits: int = field(default=4, metadata={"help": "activation bits (each layer's input, per tensor)"})
    rank: int = field(default=32, metadata={"help": "LoRA rank of every quantized layer not kept at 8 bits"})
    steps: int = field(
        default=100, metadata={"help": "entries of each activation table: the distillation schedule's steps"}
    )
    num_train_timesteps: int = field(
        default=1000, metadata={"help": "the denoiser's training timesteps (the tables' default DDIM schedule)"}
    )
    keep_fp: tuple[str, ...] | None = field(
        default=None, metadata={"help": "layers left in floating point (patterns); unset: shortcuts, downsamplers"}
    )
    keep_8bit: tuple[str, ...] | None = field(
        default=None, metadata={"help": "layers at 8 bits without LoRA (patterns); unset: first and last layers"}
    )
    lora_lr_divisor: float = field(
        default=2500.0, metadata={"help": "each layer's LoRA learning rate is mean(weight step) / this"}
    )
    weight_step_lr: float = field(default=1e-6, metadata={"help": "learning rate of the weight steps"})
    activation_lr: float = field(default=5e-4, metadata={"help": "learning rate of the activation tables"})
    calibration_samples: int = field(
        default=32, metadata={"help": "inputs of the PTQ pass, drawn from the teacher's trajectory (the official 32)"}
    )
    resample: str = field(
        default="interpolate",
        metadata={"help": "how a sampler with fewer steps reads the tables: interpolate (the paper) or stride"},
    )

    def __post_init__(self) -> None:
        for label, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not 2 <= bits <= 8:
                raise ValueError(f"efficientdm {label} must be in 2..8, got {bits}")
        if self.rank < 0 or self.steps < 1:
            raise ValueError(f"efficientdm needs rank >= 0 and steps >= 1, got rank {self.rank}, steps {self.steps}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"efficientdm resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")

    # -- which layers ------------------------------------------------------------------------------------------
    def layer_plan(self, backbone: nn.Module) -> dict[str, str]:
        """name -> "fp" | "8bit" | "lora" for every Linear / Conv2d of the denoiser."""
        family = backbone.family  # a denoiser's ("unet" / "dit"): `needs_denoiser` refused the rest
        keep_fp = self.keep_fp if self.keep_fp is not None else KEEP_FP[family]
        keep_8bit = self.keep_8bit if self.keep_8bit is not None else KEEP_8BIT[family]
        plan = {}
        for name, module in backbone.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv2d):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in keep_fp):
                plan[name] = "fp"
            elif any(fnmatch.fnmatchcase(name, p) for p in keep_8bit):
                plan[name] = "8bit"
            else:
                plan[name] = "lora"
        for pattern in (*keep_fp, *keep_8bit):
            if (self.keep_fp is not None or self.keep_8bit is not None) and not any(
                fnmatch.fnmatchcase(n, pattern) for n in plan
            ):
                raise NotSupported(f"efficientdm layer pattern {pattern!r} matches no Linear / Conv2d of the denoiser")
        return plan

    def inject(self, backbone: nn.Module) -> None:
        timesteps = leading_timesteps(self.steps, self.num_train_timesteps)
        modules = dict(backbone.named_modules())
        for name, kind in self.layer_plan(backbone).items():
            if kind == "fp":
                continue
            host = modules[name]
            eight = kind == "8bit"
            piece = QALoRALayer(host, 8 if eight else self.w_bits, 8 if eight else self.a_bits,
                                rank=0 if eight else self.rank, timesteps=timesteps)  # fmt: skip
            attach(host, "qalora", piece, where="replace")

    # -- optimizer groups -------------------------------------------------------------------------------------
    def param_groups(self, named: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
        """One group per LoRA layer at mean(s_w) / `lora_lr_divisor`, the weight steps at `weight_step_lr`, the
        activation tables at `activation_lr` (absolute rates: the run's lr does not scale them)."""
        groups = []
        for name, step in named.items():
            if not name.endswith(".qalora.w_quant.step"):
                continue
            layer = name.removesuffix(".w_quant.step")
            lora = [n for n in named if n.startswith(layer + ".lora.")]
            if lora:
                lr = float(step.detach().float().mean()) / self.lora_lr_divisor
                groups.append({"name": f"lora:{layer.removesuffix('.qalora')}", "params": lora, "lr": lr})
        steps = [n for n in named if n.endswith(".qalora.w_quant.step")]
        tables = [n for n in named if ".qalora.a_quant." in n]
        groups.append({"name": "weight_steps", "params": steps, "lr": self.weight_step_lr})
        groups.append({"name": "activation_tables", "params": tables, "lr": self.activation_lr})
        return [g for g in groups if g["params"]]

    # -- calibration and schedules --------------------------------------------------------------------------
    def calibrated(self, backbone: nn.Module) -> bool:
        return all(bool(q.calibrated) for q in quantizers(backbone))

    @torch.no_grad()
    def calibrate(self, backbone: nn.Module, inputs: BackboneInput, timesteps: Sequence[int] | torch.Tensor) -> None:
        """The PTQ pass: the tables named for `timesteps` (the distillation / sampling schedule, `steps` long), then
        one forward of `inputs` (samples of the full-precision model's trajectory) in which every uncalibrated
        activation quantizer takes the L_p range of its own input, in module order."""
        todo = [q for q in quantizers(backbone) if not bool(q.calibrated)]
        if not todo:
            return
        for q in todo:
            q.set_timesteps(timesteps)
        was_training = backbone.training
        for q in todo:
            q.observing = True
        try:
            backbone.eval()
            backbone(inputs)
        finally:
            for q in todo:
                q.observing = False
            backbone.train(was_training)

    def prepare(self, backbone: nn.Module, data: Any, may_build: bool = True, log: Any = print) -> None:
        """Calibrate from the run's teacher trajectory (`data.teacher_inputs`, a diffusion task's) unless the tables
        are calibrated already (a loaded adapter file)."""
        if self.calibrated(backbone):
            return
        source = getattr(data, "teacher_inputs", None)
        if source is None:
            raise NotSupported(
                "efficientdm calibrates its activation quantizers on the full-precision model's own sampling "
                "trajectory, which a diffusion task provides (LatentDiffusion, EfficientDMDistillation); outside a "
                "run call EfficientDM.calibrate(backbone, inputs, timesteps) first"
            )
        inputs, timesteps = source(self.calibration_samples, self.steps)
        log(f"efficientdm: calibrating {len(quantizers(backbone))} activation quantizers on {len(inputs.x)} samples "
            "of the full-precision model's trajectory")  # fmt: skip
        self.calibrate(backbone, inputs, timesteps)

    def use_schedule(self, backbone: nn.Module, timesteps: Sequence[int] | torch.Tensor | None) -> None:
        """A sampler's schedule: its step index i reads each table at its own i-th timestep (`resample` mode)."""
        for q in quantizers(backbone):
            q.use_schedule(timesteps, self.resample)

    @torch.no_grad()
    def stand_in_state(self, backbone: nn.Module) -> None:
        """Tables of their real size from a unit-normal calibration (a bench measures cost, not values)."""
        g = torch.Generator().manual_seed(0)
        for q in quantizers(backbone):
            if not bool(q.calibrated):
                q.calibrate(torch.randn(4096, generator=g))

    def _why_not_mergeable(self) -> str:
        return (
            "its activation quantizers are part of the trained function (a W4A4 model is not a float model with a "
            "LoRA); its deployable form is the integer export (mmpeft.interop.int_export: B A folded into the "
            "integers once, no floating-point side branch)"
        )
