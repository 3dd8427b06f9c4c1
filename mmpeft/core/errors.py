"""The errors mmpeft raises on bad input; each message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "MmpeftError",
    "NotSupported",
    "NotMergeable",
    "UnknownName",
    "AdapterMismatch",
    "WeightsUnavailable",
    "OutputExists",
    "ConfigMismatch",
    "DiskFull",
]


class MmpeftError(Exception):
    """Base class, so callers can catch every mmpeft input error at once."""


class NotSupported(MmpeftError, TypeError):
    """A method or feature cannot run on this backbone (e.g. a token method on a Swin)."""


class NotMergeable(MmpeftError, RuntimeError):
    """The method has a non-linearity or extra tokens, so it cannot fold into the backbone."""


class UnknownName(MmpeftError, KeyError):
    """A registry lookup failed (method, backbone, preset)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterMismatch(MmpeftError, ValueError):
    """An adapter file was made for another backbone, method or head."""


class WeightsUnavailable(MmpeftError, OSError):
    """Pretrained weights could not be loaded (offline hub name, missing or foreign file)."""


class OutputExists(MmpeftError, FileExistsError):
    """An output file is already there; it is replaced only when the user asks (--overwrite)."""


class ConfigMismatch(MmpeftError, ValueError):
    """Options that cannot work together (the data's clouds and the backbone's grouping, a backbone's widths),
    found when the model and data are built rather than at the first forward; the message names both values."""


class DiskFull(MmpeftError, OSError):
    """A file could not be written because its disk (or quota) is full; the message names the file."""
