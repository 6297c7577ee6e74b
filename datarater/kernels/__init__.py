"""Loss-layer kernels behind one dispatch.

``weighted_cross_entropy`` (given logits) and ``linear_weighted_cross_entropy`` (the output
projection fused in, chunked so that no N x V tensor is written) compute per-token
``w_n (lse(z_n) - z_n[y_n])``, differentiable in every AD mode PyTorch has.

Backends (``backend=``): ``"torch"`` (the plain-torch reference, any device and dtype),
``"cpu"`` (C++), ``"cuda"`` (CUDA C++), ``"triton"`` (GPU, or the CPU under
``TRITON_INTERPRET=1``). ``backend=None`` picks the best one available for the input;
``DATARATER_BACKEND`` in the environment overrides that choice.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._ext import extension, load_error
from .cross_entropy import cross_entropy_per_token, fused_reduced_cross_entropy
from .native import CPU, CUDA
from .primitives import TORCH, Primitives, _wrapped
from .reference import weighted_cross_entropy_reference

BACKENDS = ("torch", "cpu", "cuda", "triton")
_REDUCTIONS = ("none", "sum", "mean")


def _triton():
    from .triton_ce import TRITON

    return TRITON


def _primitives(name: str) -> Primitives:
    if name == "torch":
        return TORCH
    if name == "cpu":
        return CPU
    if name == "cuda":
        return CUDA
    if name == "triton":
        return _triton()
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this installation."""
    probe = torch.empty(1, 1, device=device)
    return [b for b in BACKENDS if _primitives(b).reason_unsupported(probe) is None]


def select_backend(logits: Tensor, backend: str | None = None) -> Primitives:
    """The backend named (checked), or the best one for these logits."""
    backend = backend or os.environ.get("DATARATER_BACKEND") or None
    if backend is not None:
        prim = _primitives(backend)
        reason = prim.reason_unsupported(logits)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run this input: {reason}")
        return prim
    # CUDA C++ before Triton: faster at every size measured (bench/RESULTS.md, H200)
    order = ("cuda", "triton", "torch") if logits.is_cuda else ("cpu", "torch")
    for name in order:
        prim = _primitives(name)
        if prim.reason_unsupported(logits) is None:
            return prim
    return TORCH


def validate(logits: Tensor, targets: Tensor, weights: Tensor | None, ignore_index: int) -> None:
    """Shape, dtype, device and range checks shared by every backend."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"logits must be a tensor [N, V], got {shape}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n, v = logits.shape
    if not isinstance(targets, Tensor) or targets.shape != (n,):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets)
        raise ValueError(f"targets must be [N] = [{n}], got {shape}")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (n,):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
            raise ValueError(f"weights must be [N] = [{n}], got {shape}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        if weights.device != logits.device:
            raise ValueError(f"weights are on {weights.device} but logits on {logits.device}")
        if n and not bool(torch.isfinite(weights).all()):
            raise ValueError("weights contain NaN or inf")
    if n:
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target {int(targets[i])} at position {i} is out of range for a vocabulary of "
                f"{v} (ignore_index={ignore_index})"
            )


def _reduce(
    loss: Tensor, targets: Tensor, weights: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    valid = (targets != ignore_index).to(loss.dtype)
    denom = valid.sum() if weights is None else (weights.to(loss.dtype) * valid).sum()
    return loss.sum() / denom


def _first_order_only(logits: Tensor, weights: Tensor | None) -> bool:
    """Whether a loss computed now can only be differentiated once, in reverse mode."""
    from torch.autograd import forward_ad

    return (
        torch.is_grad_enabled()
        and logits.requires_grad
        # float16 would store the unscaled gradient (coef = 1 / N under a mean) before a loss
        # scaler multiplies it: small values would flush to zero
        and logits.dtype != torch.float16
        and not (weights is not None and weights.requires_grad)
        and not _wrapped(logits, weights)
        and forward_ad._current_level < 0
    )


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "none",
    backend: str | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Weighted per-token cross-entropy ``w_n (lse(z_n) - z_n[y_n])`` from logits [N, V].

    Returns float32 per-token losses (float64 for float64 logits), or their ``"sum"``, or
    their weighted ``"mean"`` (sum over the weights of non-ignored tokens). Differentiable in
    ``logits`` and ``weights`` in reverse and forward mode, to second order.

    ``inplace_backward=True`` writes the gradient into the logits' memory, saving an N x V
    allocation: the logits are destroyed, so use it only when nothing reads them later. With
    ``reduction="none"`` that happens during a plain (first-order) backward, after which the
    logits' version moves on (a later backward through anything that saved them fails
    loudly; a plain read of them gets the gradient), and double backward takes the regular
    path. With ``"sum"`` or ``"mean"`` the gradient is computed
    in the forward pass already (one kernel: the least memory traffic there is), so the
    logits are overwritten as soon as the call returns and the loss can be differentiated
    once, to first order. torch.func transforms, forward-mode AD, float16 logits and weights
    that require gradients always take the regular path.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    validate(logits, targets, weights, ignore_index)
    prim = select_backend(logits, backend)
    if inplace_backward and reduction != "none" and _first_order_only(logits, weights):
        return fused_reduced_cross_entropy(logits, targets, weights, ignore_index, reduction, prim)
    loss = cross_entropy_per_token(logits, targets, weights, ignore_index, prim, inplace_backward)
    return _reduce(loss, targets, weights, ignore_index, reduction)


def extension_status() -> str:
    """``"built"`` or why the compiled extension is missing."""
    return "built" if extension() is not None else f"missing: {load_error()}"


from .linear_cross_entropy import linear_weighted_cross_entropy  # noqa: E402

__all__ = [
    "BACKENDS",
    "available_backends",
    "extension_status",
    "linear_weighted_cross_entropy",
    "select_backend",
    "validate",
    "weighted_cross_entropy",
    "weighted_cross_entropy_reference",
]
