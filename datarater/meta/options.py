"""The settings of one ``meta_step`` call, in one frozen object (checked in preflight)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("mixed", "reverse")
HVP_PASSES = ("auto", "func", "double")
ON_NONFINITE = ("raise", "skip")
REMAT = ("auto", "block", None)
COMPUTE_DTYPES = (torch.bfloat16,)


@dataclass(frozen=True)
class Options:
    """The settings as ``meta_step`` documents them."""

    mode: str = "mixed"
    tau: float = 1.0
    micro_batch_size: int | None = None
    on_nonfinite: str = "raise"
    hvp: str = "auto"
    loss_backend: str | None = None
    compute_dtype: torch.dtype | None = None
    remat: str | None = "auto"
