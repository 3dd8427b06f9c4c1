"""Writing run files (adapter files, checkpoints, summaries) so that a full disk is named, not a bare errno.

A full disk surfaces in many shapes: an `OSError` with errno ENOSPC (or EDQUOT, a full quota) from `open` or a
`write` that knows no file name, safetensors' `SafetensorError` wrapping Rust's `StorageFull`, torch's
"file write failed". `writing(path, what)` turns each into one `DiskFull` naming the file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmpeft.core.errors import DiskFull

__all__ = ["writing", "disk_full_reason", "disk_full_message", "cache_dir"]

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def disk_full_reason(err: BaseException | None) -> tuple[str, str | None] | None:
    """(reason, file name if the error knows it) when `err` or an error behind it is a full disk, else None."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return os.strerror(err.errno), err.filename
        text = str(err)
        found = next((t for t in FULL_TEXTS if t in text), None)
        if found is not None:
            return ("Disk quota exceeded" if "Quota" in found else "No space left on device"), None
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def disk_full_message(what: str, reason: str) -> str:
    return (
        f"cannot write {what}: the disk is full ({reason}); free space there, or write the run elsewhere "
        "(--run.dir), then rerun"
    )


@contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Run a write of `path`; a full disk becomes `DiskFull` naming `what` (e.g. "the adapter file") and `path`."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        full = disk_full_reason(err)
        if full is None:
            raise
        raise DiskFull(disk_full_message(f"{what} {os.fspath(path)}".strip(), full[0])) from err


def cache_dir() -> Path:
    """Where mmpeft caches what it builds (quickstart weights, the tiny pipelines, Point-PEFT's memory banks):
    `$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    return Path(os.environ.get("MMPEFT_CACHE", Path.home() / ".cache" / "mmpeft"))
