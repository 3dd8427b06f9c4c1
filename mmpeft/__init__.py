"""mmpeft: parameter-efficient fine-tuning of frozen foundation models across modalities."""

__version__ = "0.1.0"

from mmpeft import methods  # noqa: E402,F401  (registers the built-in methods)
from mmpeft.core import (  # noqa: E402
    PeftModel,
    create_method,
    list_methods,
    load_adapter,
    parameter_report,
    save_adapter,
)

__all__ = ["PeftModel", "create_method", "list_methods", "load_adapter", "parameter_report", "save_adapter"]
