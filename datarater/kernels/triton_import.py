"""Triton, when installed: ``triton`` and ``tl`` are None without it and ``IMPORT_ERROR`` says
why. The Triton kernel modules import it from here, so that the library imports without it."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except ImportError as e:  # triton is optional
    triton = tl = None
    IMPORT_ERROR = str(e)
