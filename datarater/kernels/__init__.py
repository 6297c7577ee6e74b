"""Loss-layer kernels behind one dispatch.

``weighted_cross_entropy`` computes per-token weighted cross-entropy. Today the only backend is
``torch`` (the plain-torch reference in :mod:`datarater.kernels.reference`); the fused C++,
CUDA and Triton backends plug in behind the same ``backend=`` switch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import weighted_cross_entropy_reference

BACKENDS = ("torch",)
_REDUCTIONS = ("none", "sum", "mean")


def _validate(logits: Tensor, targets: Tensor, weights: Tensor | None, ignore_index: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n, v = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N] = [{n}], got shape {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}")
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights must be [N] = [{n}], got shape {tuple(weights.shape)}")
        if weights.device != logits.device:
            raise ValueError(f"weights on {weights.device} but logits on {logits.device}")
        if not torch.isfinite(weights).all():
            raise ValueError("weights contain NaN or inf")
    if n:
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= v))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target id {int(targets[i])} at position {i} is out of range for a vocabulary "
                f"of {v} (ignore_index={ignore_index})"
            )


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "none",
    backend: str | None = None,
) -> Tensor:
    """Weighted per-token cross-entropy ``w_n (lse(z_n) - z_n[y_n])``.

    ``reduction``: ``"none"`` (per-token float32, or float64 for float64 logits), ``"sum"``, or
    ``"mean"`` (the weighted mean: sum of losses over the sum of weights of non-ignored tokens).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    backend = backend or "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown or unavailable backend {backend!r}; available: {BACKENDS}")
    _validate(logits, targets, weights, ignore_index)
    loss = weighted_cross_entropy_reference(logits, targets, weights, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    valid = (targets != ignore_index).to(loss.dtype)
    denom = valid.sum() if weights is None else (weights.to(loss.dtype) * valid).sum()
    return loss.sum() / denom


__all__ = ["BACKENDS", "weighted_cross_entropy", "weighted_cross_entropy_reference"]
