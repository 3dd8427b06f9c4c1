"""Moved: the ScanObjectNN and ModelNet40 data modules have a file each (`mmpeft.data.scanobjectnn`,
`mmpeft.data.modelnet40`) over the shared `mmpeft.data.point_clouds`; this path keeps old imports working and will
be removed."""

import warnings

from mmpeft.data.modelnet40 import *  # noqa: F403
from mmpeft.data.point_clouds import *  # noqa: F403
from mmpeft.data.scanobjectnn import *  # noqa: F403

warnings.warn(
    "`mmpeft.data.point` moved to `mmpeft.data.scanobjectnn`, `mmpeft.data.modelnet40` and `mmpeft.data.point_clouds`",
    DeprecationWarning,
    stacklevel=2,
)
