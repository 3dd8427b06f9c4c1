"""Moved to `mmpeft.lab.plot`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.lab.plot import *  # noqa: F403
from mmpeft.lab.plot import __all__  # noqa: F401

warnings.warn("`mmpeft.plot` moved to `mmpeft.lab.plot`", DeprecationWarning, stacklevel=2)
