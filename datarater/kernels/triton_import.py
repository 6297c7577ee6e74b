"""Triton, when installed: ``triton`` and ``tl`` are None without it and ``IMPORT_ERROR`` says
why. The Triton kernel modules import it from here, so that the library imports without it,
with the two helpers every launcher needs."""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except ImportError as e:  # triton is optional
    triton = tl = None
    IMPORT_ERROR = str(e)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (the tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device(t: torch.Tensor):
    """A context in which a launch goes to ``t``'s GPU: Triton launches on the current CUDA
    device, which need not be the one holding the tensors."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
