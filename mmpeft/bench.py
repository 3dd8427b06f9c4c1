"""Moved to `mmpeft.lab.bench`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.lab.bench import *  # noqa: F403
from mmpeft.lab.bench import __all__  # noqa: F401

warnings.warn("`mmpeft.bench` moved to `mmpeft.lab.bench`", DeprecationWarning, stacklevel=2)
