"""Built-in methods; importing this package registers them."""

from mmpeft.methods.adapter import Adapter
from mmpeft.methods.any2point import Any2PointAdapter
from mmpeft.methods.baselines import BitFit, FullFinetune, LinearProbe
from mmpeft.methods.difffit import DiffFit
from mmpeft.methods.efficientdm import EfficientDM
from mmpeft.methods.lora import LoRA
from mmpeft.methods.mosa import MoSA
from mmpeft.methods.point_peft import PointPEFT
from mmpeft.methods.ssf import SSF
from mmpeft.methods.svfit import SVFit
from mmpeft.methods.vl_pet import VLPET
from mmpeft.methods.vpt import VPT

__all__ = [
    "Adapter",
    "Any2PointAdapter",
    "BitFit",
    "DiffFit",
    "EfficientDM",
    "FullFinetune",
    "LinearProbe",
    "LoRA",
    "MoSA",
    "PointPEFT",
    "SSF",
    "SVFit",
    "VLPET",
    "VPT",
]
