"""LightningDataModules and the embedded offline datasets."""

from mmpeft.data.digits import DigitsDataModule
from mmpeft.data.dreambooth import DreamBoothDataModule
from mmpeft.data.fgvc import FGVCDataModule
from mmpeft.data.image_folders import CaptionedImagesDataModule, ClassFolderDataModule
from mmpeft.data.image_list import ImageListDataModule
from mmpeft.data.modelnet40 import ModelNet40DataModule
from mmpeft.data.scanobjectnn import ScanObjectNNDataModule
from mmpeft.data.shapes import ShapesDataModule
from mmpeft.data.toy import DigitLatentsDataModule, ToyRegressionDataModule
from mmpeft.data.trajectory import TrajectoryDataModule
from mmpeft.data.vtab import VTAB1kDataModule

__all__ = [
    "TrajectoryDataModule",
    "CaptionedImagesDataModule",
    "ClassFolderDataModule",
    "DigitsDataModule",
    "DigitLatentsDataModule",
    "DreamBoothDataModule",
    "FGVCDataModule",
    "ImageListDataModule",
    "ModelNet40DataModule",
    "ScanObjectNNDataModule",
    "ShapesDataModule",
    "ToyRegressionDataModule",
    "VTAB1kDataModule",
]
