"""LightningDataModules and the embedded offline datasets."""

from mmpeft.data.digits import DigitsDataModule
from mmpeft.data.image_list import ImageListDataModule

__all__ = ["DigitsDataModule", "ImageListDataModule"]
