"""A restricted unpickler for pickles that hold only numpy arrays (Point-BERT's ModelNet40 files): it resolves
the few globals arrays need and refuses any other one when the pickle names it, before anything runs."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mmpeft.data.checks import DataError

__all__ = ["ArrayUnpickler"]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as protocol 2 stores bytes: (str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as protocol-2 pickles store b''; any argument (`bytes(10**12)`) is refused."""
    if args:
        raise pickle.UnpicklingError("bytes(...) is allowed only without arguments (protocol 2's b'')")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy arrays and dtypes need, under both numpy 1's and numpy 2's module names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol 5
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy arrays need; any other global (os.system, a class whose `__reduce__` runs
    code, ...) is refused when the pickle names it, before anything is called."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path, self.allowed = path, _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self.path}: it references the global {module}.{name}, but a ModelNet40 pickle "
                "holds only numpy arrays (allowed: numpy ndarray / dtype / _reconstruct / scalar / _frombuffer). "
                "It is not Point-BERT's file or it was tampered with; nothing in it was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to load {self.path}: it uses persistent ids, which a ModelNet40 pickle never does")
