"""Loading the compiled extension ``datarater._C`` (optional: the torch path works without)."""

from __future__ import annotations

import importlib

_module = None
_error: str | None = None


def extension():
    """The compiled module, or None when it was not built (``load_error()`` says why)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("datarater._C")
        except ImportError as e:  # not built, or built against another torch
            _error = str(e)
    return _module


def load_error() -> str | None:
    extension()
    return _error
