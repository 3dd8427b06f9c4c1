"""LightningModules: the shared base and one per task family."""

from mmpeft.tasks.base import PeftTask
from mmpeft.tasks.classification import ImageClassification

__all__ = ["PeftTask", "ImageClassification"]
