"""User-facing errors.

Anything a user can cause (bad config value, unknown name, missing or corrupt file) raises a
subclass of :class:`NtkitError` with a one-line message naming the field and the value. The CLI
prints such errors as a single line and exits non-zero; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "NtkitError", "UnsupportedModelError", "check"]


class NtkitError(Exception):
    """Base class of user errors (printed as one line by the CLI)."""


class ConfigError(NtkitError, ValueError):
    """A configuration field has an invalid value."""


class DataError(NtkitError, OSError):
    """A dataset file is missing, truncated or corrupt."""


class UnsupportedModelError(NtkitError, TypeError):
    """A model cannot be handled by the requested operation (e.g. coupled samples)."""


def check(cond: bool, field: str, value: object, expected: str) -> None:
    """Raise :class:`ConfigError` ``"<field>=<value!r>: expected <expected>"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field}={value!r}: expected {expected}")
