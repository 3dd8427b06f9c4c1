"""Moved to `mmpeft.backbones.tiny_diffusers`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.backbones.tiny_diffusers import *  # noqa: F403
from mmpeft.backbones.tiny_diffusers import __all__  # noqa: F401

warnings.warn("`mmpeft.interop.tiny_sd` moved to `mmpeft.backbones.tiny_diffusers`", DeprecationWarning, stacklevel=2)
