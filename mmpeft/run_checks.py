"""Moved to `mmpeft.lab.run_checks`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.lab.run_checks import *  # noqa: F403
from mmpeft.lab.run_checks import __all__  # noqa: F401

warnings.warn("`mmpeft.run_checks` moved to `mmpeft.lab.run_checks`", DeprecationWarning, stacklevel=2)
