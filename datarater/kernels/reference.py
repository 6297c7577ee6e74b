"""Plain-torch weighted per-token cross-entropy: the reference every backend is checked against.

It is also the fallback path: it runs on any device and dtype (float64 included) and is
differentiable in every mode PyTorch offers (reverse, forward, forward-over-reverse, double
backward), because it is made of ordinary torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_cross_entropy_reference(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Per-token ``w_n * (lse(z_n) - z_n[y_n])`` in at least float32; 0 for ignored tokens."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss = torch.logsumexp(z, dim=-1) - z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return torch.where(valid, loss, 0.0)
