"""LightningModules: the shared base and one per task family."""

from mmpeft.tasks.base import PeftTask
from mmpeft.tasks.classification import ImageClassification
from mmpeft.tasks.clip import CLIPClassification

__all__ = ["PeftTask", "ImageClassification", "CLIPClassification"]
