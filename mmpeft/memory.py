"""Moved: the saved-for-backward breakdown is `mmpeft.lab.memory`, the process peak `mmpeft.core.process_memory`,
the machine description `mmpeft.lab.records.process_environment`; this path keeps old imports working and will be
removed."""

import warnings

from mmpeft.core.process_memory import ProcessPeak  # noqa: F401
from mmpeft.lab.memory import *  # noqa: F403
from mmpeft.lab.records import process_environment  # noqa: F401

warnings.warn(
    "`mmpeft.memory` moved to `mmpeft.lab.memory` and `mmpeft.core.process_memory`", DeprecationWarning, stacklevel=2
)
