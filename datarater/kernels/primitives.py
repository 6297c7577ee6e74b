"""The two primitives every cross-entropy backend provides, and their plain-torch version.

All derivatives of weighted per-token cross-entropy (design.md section 3.1) reduce to two
streaming passes over a row of logits z with p = softmax(z):

* ``forward``: ``lse = logsumexp(z)``, ``nll = lse - z_y``, ``loss = w * nll``;
* ``directional``: for an optional direction D shaped like the logits,
  ``dot = p . D - D_y`` (the forward-mode tangent of nll) and
  ``out = coef_h * (p * D - p (p . D)) + coef_g * (p - e_y)``, which is the gradient
  (D = None, coef_g = upstream x weight), the tangent of the gradient (forward-over-reverse),
  and the double backward, depending on the arguments.

Ignored rows (target == ignore_index) give zeros everywhere. Backends differ only in how they
compute these two passes: ``TorchPrimitives`` here (any device and dtype, float64 included, the
reference), ``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Primitives:
    """Interface of a backend. ``reason_unsupported`` says why a call cannot run here."""

    name = "abstract"

    def reason_unsupported(self, logits: Tensor) -> str | None:
        raise NotImplementedError

    def forward(
        self, logits: Tensor, targets: Tensor, weights: Tensor | None, ignore_index: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def directional(
        self,
        logits: Tensor,
        targets: Tensor,
        lse: Tensor,
        direction: Tensor | None,
        coef_h: Tensor | None,
        coef_g: Tensor | None,
        ignore_index: int,
        want_out: bool,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward_grad(
        self,
        logits: Tensor,
        targets: Tensor,
        coef: Tensor,
        ignore_index: int,
        out: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``forward`` with weights ``coef`` and the gradient ``coef * (p - e_y)`` written to
        ``out`` (which may be the logits themselves). Backends that can fuse the two passes do
        it in one kernel, so the second read of a row comes from cache."""
        loss, lse, nll = self.forward(logits, targets, coef, ignore_index)
        _, g = self.directional(logits, targets, lse, None, None, coef, ignore_index, True, out)
        return loss, lse, nll, g


def accum_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class TorchPrimitives(Primitives):
    """Plain torch: materialises N x V temporaries, runs anywhere, float64-exact."""

    name = "torch"

    def reason_unsupported(self, logits: Tensor) -> str | None:
        return None

    def forward(self, logits, targets, weights, ignore_index):
        z = logits.to(accum_dtype(logits))
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        lse = torch.logsumexp(z, dim=-1) if z.shape[-1] else z.new_zeros(z.shape[0])
        if z.shape[-1]:
            nll = torch.where(valid, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0)
        else:
            nll = z.new_zeros(z.shape[0])
        # a tensor of its own: the Functions mark nll non-differentiable, never the loss
        loss = nll.clone() if weights is None else nll * weights.to(z.dtype)
        return loss, lse, nll

    def directional(
        self, logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out=None
    ):
        dt = accum_dtype(logits)
        z = logits.to(dt)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        p = torch.exp(z - lse.to(dt)[:, None])
        dot = torch.zeros(z.shape[0], dtype=dt, device=z.device)
        res = None
        if direction is not None:
            d = direction.to(dt)
            pd = (p * d).sum(1)
            dot = torch.where(valid, pd - d.gather(1, safe).squeeze(1), 0.0)
        if want_out:
            res = torch.zeros_like(z)
            if direction is not None and coef_h is not None:
                res = coef_h.to(dt)[:, None] * p * (d - pd[:, None])
            if coef_g is not None:
                g = coef_g.to(dt)[:, None]
                res = res + g * p
                res = res.scatter_add(1, safe, -g)
            res = torch.where(valid[:, None], res, 0.0).to(logits.dtype)
            if out is not None:
                out.copy_(res)
                res = out
        return dot, res


TORCH = TorchPrimitives()


# ---------------------------------------------------------------------------------------------
# Calling the primitives from inside derivative formulas.
#
# Under torch.func, an autograd.Function's backward and jvp run on tensors wrapped by the
# transform; only torch ops and other Functions can take those. These helpers therefore call a
# backend directly on plain tensors, and through an opaque Function otherwise. The opaque call
# has no derivatives of its own: the Functions of cross_entropy.py define them.


def _wrapped(*tensors) -> bool:
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


class _DirectionalCall(torch.autograd.Function):
    @staticmethod
    def forward(logits, targets, lse, direction, coef_h, coef_g, prim, ignore_index, want_out):
        dot, out = prim.directional(
            logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out
        )
        return dot, (out if want_out else dot.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*output)

    @staticmethod
    def jvp(ctx, *tangents):
        return None, None


def directional(
    prim: Primitives,
    logits,
    targets,
    lse,
    direction,
    coef_h,
    coef_g,
    ignore_index: int,
    want_out: bool,
    out=None,
):
    """``prim.directional`` that also works on tensors wrapped by torch.func transforms."""
    if not _wrapped(logits, lse, direction, coef_h, coef_g):
        return prim.directional(
            logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out
        )
    dot, res = _DirectionalCall.apply(
        logits, targets, lse, direction, coef_h, coef_g, prim, ignore_index, want_out
    )
    return dot, (res if want_out else None)
