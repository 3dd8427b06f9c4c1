"""The package version, in a leaf module every layer may read (the core stamps it into adapter files)."""

__version__ = "0.1.0"
