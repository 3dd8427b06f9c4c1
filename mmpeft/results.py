"""Moved to `mmpeft.lab.results`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.lab.results import *  # noqa: F403
from mmpeft.lab.results import __all__  # noqa: F401

warnings.warn("`mmpeft.results` moved to `mmpeft.lab.results`", DeprecationWarning, stacklevel=2)
