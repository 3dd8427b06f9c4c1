"""Built-in methods; importing this package registers them."""

from mmpeft.methods.adapter import Adapter
from mmpeft.methods.baselines import BitFit, FullFinetune, LinearProbe
from mmpeft.methods.lora import LoRA

__all__ = ["Adapter", "BitFit", "FullFinetune", "LinearProbe", "LoRA"]
