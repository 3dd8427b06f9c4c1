"""Moved to `mmpeft.methods.info`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.methods.info import *  # noqa: F403
from mmpeft.methods.info import __all__  # noqa: F401

warnings.warn("`mmpeft.method_info` moved to `mmpeft.methods.info`", DeprecationWarning, stacklevel=2)
