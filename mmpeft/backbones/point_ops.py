"""Moved to `mmpeft.ops.point`; this path keeps old imports working and will be removed."""

import warnings

from mmpeft.ops.point import *  # noqa: F403
from mmpeft.ops.point import __all__  # noqa: F401

warnings.warn("`mmpeft.backbones.point_ops` moved to `mmpeft.ops.point`", DeprecationWarning, stacklevel=2)
