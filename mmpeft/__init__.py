"""mmpeft: parameter-efficient fine-tuning of frozen foundation models across modalities."""

from mmpeft import backbones, methods  # noqa: F401  (registers the built-in methods and backbones)
from mmpeft.core import (
    PeftModel,
    create_method,
    list_methods,
    load_adapter,
    parameter_report,
    save_adapter,
)
from mmpeft.version import __version__

__all__ = [
    "__version__",
    "PeftModel",
    "create_method",
    "list_methods",
    "load_adapter",
    "parameter_report",
    "save_adapter",
]
