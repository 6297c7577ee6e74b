"""Weighted per-token cross-entropy as autograd Functions that every AD mode can use.

Three Functions, all written in the ``forward`` + ``setup_context`` style with a ``jvp``, so that
they work under ``loss.backward()``, ``torch.func.grad/vjp/jvp``, forward-over-reverse
(``jvp`` of ``grad``), ``gradcheck`` and ``gradgradcheck``:

* ``_CrossEntropy(z, w) = w * nll(z)``: the loss;
* ``_Grad(z, c) = c * (p - e_y)``: its gradient in z, a Function of its own so that the
  backward pass can itself be differentiated (forward mode for meta-gradients, reverse mode
  for double backward);
* ``_NLL(z) = nll(z)``: the gradient in the weights, for the same reason.

Each is two streaming passes of a backend's primitives (see ``primitives.py``); none of them
builds an N x V temporary beyond the gradient it returns. ``_FusedReducedCE`` is the fast path
for first-order training on a summed or averaged loss (``inplace_backward=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function, forward_ad

from .primitives import Primitives, _wrapped, directional


def _scaled(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a * b


def _plain_backward(*tensors: Tensor | None) -> bool:
    """Whether a backward now is first order only: no graph of it is built (reverse mode), no
    tangent rides on it (forward mode), no torch.func transform wraps it."""
    return not torch.is_grad_enabled() and forward_ad._current_level < 0 and not _wrapped(*tensors)


class _CrossEntropy(Function):
    @staticmethod
    def forward(logits, weights, targets, prim: Primitives, ignore_index: int, inplace: bool):
        return prim.forward(logits, targets, weights, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, weights, targets, prim, ignore_index, inplace = inputs
        _, lse, nll = output
        ctx.mark_non_differentiable(lse, nll)
        ctx.prim, ctx.ignore_index, ctx.inplace = prim, ignore_index, inplace
        ctx.has_weights = weights is not None
        ctx.save_for_backward(logits, weights, targets, lse, nll)
        ctx.save_for_forward(logits, weights, targets, lse, nll)

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_nll):
        logits, weights, targets, lse, nll = ctx.saved_tensors
        g_logits = g_weights = None
        if ctx.needs_input_grad[0]:
            coef = _scaled(g_loss, weights.to(g_loss.dtype) if ctx.has_weights else None)
            if ctx.inplace and _plain_backward(logits, coef):
                # First-order training only: the gradient overwrites the logits' memory, and
                # their version moves on, so that a later backward that saved them fails.
                g_logits = ctx.prim.directional(
                    logits, targets, lse, None, None, coef, ctx.ignore_index, True, out=logits
                )[1]
                torch.autograd.graph.increment_version(logits)
            else:
                g_logits = _Grad.apply(logits, lse, coef, targets, ctx.prim, ctx.ignore_index)
        if ctx.has_weights and ctx.needs_input_grad[1]:
            nll_z = _NLL.apply(logits, lse, nll, targets, ctx.prim, ctx.ignore_index)
            g_weights = (g_loss * nll_z).to(weights.dtype)
        return g_logits, g_weights, None, None, None, None

    @staticmethod
    def jvp(ctx, d_logits, d_weights, *_):
        logits, weights, targets, lse, nll = ctx.saved_tensors
        d_loss = torch.zeros_like(nll)
        if d_logits is not None:
            dot, _ = directional(
                ctx.prim, logits, targets, lse, d_logits, None, None, ctx.ignore_index, False
            )
            d_loss = dot if not ctx.has_weights else dot * weights.to(dot.dtype)
        if ctx.has_weights and d_weights is not None:
            d_loss = d_loss + d_weights.to(nll.dtype) * nll
        return d_loss, None, None


class _NLL(Function):
    """nll(z) = lse(z) - z_y, returning the value saved by the forward pass."""

    @staticmethod
    def forward(logits, lse, nll, targets, prim: Primitives, ignore_index: int):
        return nll.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, lse, _, targets, prim, ignore_index = inputs
        ctx.prim, ctx.ignore_index = prim, ignore_index
        ctx.save_for_backward(logits, lse, targets)
        ctx.save_for_forward(logits, lse, targets)

    @staticmethod
    def backward(ctx, g):
        logits, lse, targets = ctx.saved_tensors
        g_logits = _Grad.apply(logits, lse, g, targets, ctx.prim, ctx.ignore_index)
        return g_logits, None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_logits, *_):
        logits, lse, targets = ctx.saved_tensors
        if d_logits is None:
            return torch.zeros_like(lse)
        dot, _ = directional(
            ctx.prim, logits, targets, lse, d_logits, None, None, ctx.ignore_index, False
        )
        return dot


class _Grad(Function):
    """c * (softmax(z) - e_y) per row: the gradient of sum_n c_n nll_n(z) in z."""

    @staticmethod
    def forward(logits, lse, coef, targets, prim: Primitives, ignore_index: int):
        return prim.directional(logits, targets, lse, None, None, coef, ignore_index, True)[1]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, lse, coef, targets, prim, ignore_index = inputs
        ctx.prim, ctx.ignore_index = prim, ignore_index
        ctx.save_for_backward(logits, lse, coef, targets)
        ctx.save_for_forward(logits, lse, coef, targets)

    @staticmethod
    def jvp(ctx, d_logits, _d_lse, d_coef, *_):
        logits, lse, coef, targets = ctx.saved_tensors
        return directional(
            ctx.prim,
            logits,
            targets,
            lse,
            d_logits,
            coef if d_logits is not None else None,
            d_coef,
            ctx.ignore_index,
            True,
        )[1]

    @staticmethod
    def backward(ctx, u):
        # out = c (p - e_y): d/dz = c (p*u - p (p.u)) (the softmax Hessian, symmetric),
        # d/dc = p.u - u_y.
        logits, lse, coef, targets = ctx.saved_tensors
        need_z, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_z or need_c):
            return None, None, None, None, None, None
        dot, g_logits = directional(
            ctx.prim, logits, targets, lse, u, coef, None, ctx.ignore_index, need_z
        )
        g_coef = dot.to(coef.dtype) if need_c else None
        return g_logits, None, g_coef, None, None, None


def cross_entropy_per_token(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    ignore_index: int,
    prim: Primitives,
    inplace_backward: bool = False,
) -> Tensor:
    """Per-token ``w * nll`` through the Functions above (inputs already validated)."""
    loss, _, _ = _CrossEntropy.apply(logits, weights, targets, prim, ignore_index, inplace_backward)
    return loss


class _FusedReducedCE(Function):
    """sum_n c_n nll_n with its gradient computed in the forward pass, over the logits.

    First-order training only: the forward writes ``c (p - e_y)`` into the logits' memory
    (``forward_grad``: two passes over the logits in all, the least memory traffic there is)
    and the backward hands that buffer back, rescaled only if the upstream gradient is not 1.
    """

    @staticmethod
    def forward(ctx, logits, coef, targets, prim: Primitives, ignore_index: int, value_w, denom):
        _, _, nll, grad = prim.forward_grad(logits, targets, coef, ignore_index, out=logits)
        # The logits now hold the gradient: anything that saved them must fail loudly.
        torch.autograd.graph.increment_version(logits)
        ctx.grad = grad
        # the value as the regular path computes it (a mean over no token is 0 / 0 = nan)
        total = (nll if value_w is None else nll * value_w.to(nll.dtype)).sum()
        return total if denom is None else total / denom

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "weighted_cross_entropy(inplace_backward=True) with a reduction is differentiable "
                "once, to first order: call it without inplace_backward for create_graph=True"
            )
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "weighted_cross_entropy(inplace_backward=True): the gradient was handed out "
                "already; backward through it runs once"
            )
        scale = float(g)  # one synchronisation; a Python float keeps the product unrounded
        if scale != 1.0:  # a loss scaled after the call
            grad.mul_(scale)
        return grad, None, None, None, None, None, None


def fused_reduced_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    ignore_index: int,
    reduction: str,
    prim: Primitives,
) -> Tensor:
    """The summed or averaged loss whose backward is already done (see ``_FusedReducedCE``)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = None if weights is None else weights.detach().to(acc)
    coef = torch.ones(targets.shape[0], dtype=acc, device=logits.device) if w is None else w
    denom = None
    if reduction == "mean":
        denom = (coef * (targets != ignore_index)).sum()
        coef = coef / denom
    return _FusedReducedCE.apply(logits, coef, targets, prim, ignore_index, w, denom)
