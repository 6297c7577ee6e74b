"""Functional, differentiable inner optimizers.

An inner optimizer maps ``(params, grads, state, step) -> (params, state)`` with plain torch ops,
so the update can be differentiated (reverse-over-reverse) or pulled back by a VJP (mixed mode).
Parameters, gradients and state are dicts of tensors keyed by parameter name; the state is a
dict of such dicts (``{"exp_avg": {...}, "exp_avg_sq": {...}}`` for Adam).

One step from a fresh state equals the matching ``torch.optim`` step (``torch.optim.SGD``,
``torch.optim.AdamW``; ``Adam`` with ``weight_decay=0`` equals ``torch.optim.Adam`` too), with
optional global-norm clipping equal to ``torch.nn.utils.clip_grad_norm_`` applied first.

To keep mixed-mode memory flat, ``meta_step`` stores theta_t and s_t per inner step but not g_t
when the optimizer can rebuild it: ``grads_for_vjp`` returns either the gradient recovered from
two consecutive states (momentum buffers and Adam moments carry it) or, when the update is
linear in the gradient, any tensor of the right shape, since its VJP then does not read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]

CLIP_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose derivative at 0 is 0 instead of inf.

    Adam's second moment is exactly 0 for parameters that never saw a gradient (embedding rows
    of absent tokens); there the update does not depend on it at all, but the plain derivative
    would multiply 0 by inf and poison the meta-gradient with NaN.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return SafeSqrtBackward.apply(grad, y)

    @staticmethod
    def jvp(ctx, dx: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return SafeSqrtBackward.apply(dx, y)


class SafeSqrtBackward(torch.autograd.Function):
    """``grad / (2 y)`` where y > 0, else 0; differentiable again (for reverse-over-reverse)."""

    @staticmethod
    def forward(grad: Tensor, y: Tensor) -> Tensor:
        return torch.where(y > 0, grad / (2 * y).clamp_min(torch.finfo(y.dtype).tiny), 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gout: Tensor) -> tuple[Tensor, Tensor]:
        grad, y = ctx.saved_tensors
        pos = y > 0
        safe_y = torch.where(pos, y, 1.0)
        d_grad = torch.where(pos, gout / (2 * safe_y), 0.0)
        d_y = torch.where(pos, -gout * grad / (2 * safe_y * safe_y), 0.0)
        return d_grad, d_y


def safe_sqrt(x: Tensor) -> Tensor:
    return _SafeSqrt.apply(x)


def global_norm(tensors: dict[str, Tensor]) -> Tensor:
    """Euclidean norm of all tensors together, with a finite derivative at 0."""
    return safe_sqrt(sum(t.pow(2).sum() for t in tensors.values()))


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    return (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)


@dataclass(frozen=True)
class InnerOptimizer:
    """Base: holds the learning rate and the optional clipping threshold."""

    lr: float
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {self.lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"{type(self).__name__}: clip_norm must be > 0, got {self.clip_norm}")

    # -- interface -------------------------------------------------------------------------
    def init(self, params: Params) -> State:
        raise NotImplementedError

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        """One update from clipped gradients; ``step`` counts from 1 (Adam's bias correction)."""
        raise NotImplementedError

    def grads_for_vjp(
        self, state: State, new_state: State, grads_like: Params, clip: Tensor | None
    ) -> Params | None:
        """The (unclipped) gradient of a step, rebuilt from its states; None if impossible."""
        return None

    @property
    def linear_in_grads(self) -> bool:
        """True when the update is affine in the gradient (its VJP never reads the gradient)."""
        return False

    @property
    def recovers_grads(self) -> bool:
        """True when ``grads_for_vjp`` can rebuild a step's gradient from its two states."""
        return False

    # -- shared ----------------------------------------------------------------------------
    def clip(self, grads: Params) -> tuple[Params, Tensor | None, Tensor]:
        """Global-norm clipping; returns (clipped grads, clip factor or None, grad norm)."""
        norm = global_norm(grads)
        if self.clip_norm is None:
            return grads, None, norm
        f = clip_factor(norm, self.clip_norm)
        return {k: g * f for k, g in grads.items()}, f, norm

    def update(
        self, params: Params, grads: Params, state: State, step: int
    ) -> tuple[Params, State]:
        """Clip, then step: the differentiable map U(theta, s, g) of the design notes."""
        clipped, _, _ = self.clip(grads)
        return self.step(params, clipped, state, step)


@dataclass(frozen=True)
class SGD(InnerOptimizer):
    """SGD with optional (Nesterov) momentum and L2 weight decay: torch.optim.SGD's rule."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        if self.weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {self.weight_decay}")

    def init(self, params: Params) -> State:
        if self.momentum == 0.0:
            return {}
        return {"momentum_buffer": {k: torch.zeros_like(p) for k, p in params.items()}}

    def step(self, params, grads, state, step):
        if self.weight_decay:
            grads = {k: g + self.weight_decay * params[k] for k, g in grads.items()}
        if self.momentum == 0.0:
            return {k: p - self.lr * grads[k] for k, p in params.items()}, {}
        # torch.optim.SGD starts the buffer at g; from a zero buffer mu*0 + g is the same.
        buf = {k: self.momentum * b + grads[k] for k, b in state["momentum_buffer"].items()}
        if self.nesterov:
            d = {k: grads[k] + self.momentum * buf[k] for k in buf}
        else:
            d = buf
        return {k: p - self.lr * d[k] for k, p in params.items()}, {"momentum_buffer": buf}

    @property
    def linear_in_grads(self) -> bool:
        return self.clip_norm is None

    @property
    def recovers_grads(self) -> bool:
        return self.momentum > 0.0 and not self.weight_decay

    def grads_for_vjp(self, state, new_state, grads_like, clip):
        if self.linear_in_grads:
            return grads_like
        if self.momentum == 0.0 or self.weight_decay:
            return None
        old, new = state["momentum_buffer"], new_state["momentum_buffer"]
        g = {k: new[k] - self.momentum * old[k] for k in new}
        return g if clip is None else {k: v / clip for k, v in g.items()}


@dataclass(frozen=True)
class Adam(InnerOptimizer):
    """Adam with decoupled weight decay (AdamW semantics; ``weight_decay=0`` is plain Adam)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam: betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"Adam: eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"Adam: weight_decay must be >= 0, got {self.weight_decay}")

    def init(self, params: Params) -> State:
        return {
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def step(self, params, grads, state, step):
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
        m = {k: b1 * v + (1.0 - b1) * grads[k] for k, v in state["exp_avg"].items()}
        v = {k: b2 * s + (1.0 - b2) * grads[k] ** 2 for k, s in state["exp_avg_sq"].items()}
        decay = 1.0 - self.lr * self.weight_decay
        new = {
            k: p * decay - (self.lr / bc1) * m[k] / (safe_sqrt(v[k]) / bc2**0.5 + self.eps)
            for k, p in params.items()
        }
        return new, {"exp_avg": m, "exp_avg_sq": v}

    @property
    def recovers_grads(self) -> bool:
        return True

    def grads_for_vjp(self, state, new_state, grads_like, clip):
        b1 = self.betas[0]
        old, new = state["exp_avg"], new_state["exp_avg"]
        g = {k: (new[k] - b1 * old[k]) / (1.0 - b1) for k in new}
        return g if clip is None else {k: v / clip for k, v in g.items()}
