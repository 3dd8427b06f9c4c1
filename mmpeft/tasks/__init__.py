"""LightningModules: the shared base and one per task family."""

from mmpeft.tasks.base import PeftTask
from mmpeft.tasks.classification import ImageClassification
from mmpeft.tasks.clip import CLIPClassification
from mmpeft.tasks.denoising import Denoising
from mmpeft.tasks.latent_diffusion import LatentDiffusion
from mmpeft.tasks.point import PointClassification
from mmpeft.tasks.quant_distillation import EfficientDMDistillation
from mmpeft.tasks.regression import Regression

__all__ = [
    "PeftTask",
    "ImageClassification",
    "CLIPClassification",
    "Denoising",
    "LatentDiffusion",
    "EfficientDMDistillation",
    "PointClassification",
    "Regression",
]
