"""Moved to `mmpeft.lab.sweep`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.lab.sweep import *  # noqa: F403
from mmpeft.lab.sweep import __all__  # noqa: F401

warnings.warn("`mmpeft.sweep` moved to `mmpeft.lab.sweep`", DeprecationWarning, stacklevel=2)
