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


CHUNK = 1 << 24  # elements per piece of the written-out VJPs: bounds their temporaries


def _chunks(t: Tensor) -> list[Tensor]:
    """Flat views of ``t`` (contiguous) in pieces of at most CHUNK elements."""
    return list(t.reshape(-1).split(CHUNK))


def _empty_like(tensors: Params) -> Params:
    return {k: torch.empty(t.shape, dtype=t.dtype, device=t.device) for k, t in tensors.items()}


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

    def update_vjp(
        self,
        params: Params,
        grads: Params,
        state: State,
        step: int,
        a_params: Params,
        a_state: State,
    ) -> tuple[Params, State, Params]:
        """Pull the adjoints of ``update``'s outputs back to its inputs: (a_params, a_state,
        a_grads). This generic version differentiates ``update`` with autograd; the library's
        optimizers override it with their derivatives written out, elementwise, which keeps a
        few parameter-sized temporaries where autograd keeps dozens."""
        th = {k: t.detach().requires_grad_(True) for k, t in params.items()}
        gg = {k: t.detach().requires_grad_(True) for k, t in grads.items()}
        ss = {
            n: {k: t.detach().requires_grad_(True) for k, t in d.items()} for n, d in state.items()
        }
        with torch.enable_grad():
            new_th, new_s = self.update(th, gg, ss, step)
        outs = [new_th[k] for k in th] + [new_s[n][k] for n in ss for k in ss[n]]
        cots = [a_params[k] for k in th] + [a_state[n][k] for n in ss for k in ss[n]]
        ins = [*th.values(), *(t for d in ss.values() for t in d.values()), *gg.values()]
        got = iter(torch.autograd.grad(outs, ins, cots, allow_unused=True, materialize_grads=True))
        a_th = {k: next(got) for k in th}
        a_s = {n: {k: next(got) for k in d} for n, d in ss.items()}
        return a_th, a_s, {k: next(got) for k in gg}

    # -- shared ----------------------------------------------------------------------------
    def _clip_scale(self, grads: Params) -> tuple[Tensor | None, Tensor | None]:
        """The clip factor f and the gradient norm (None, None without clipping)."""
        if self.clip_norm is None:
            return None, None
        norm = global_norm(grads)
        return clip_factor(norm, self.clip_norm), norm

    def _clip_vjp_(self, grads: Params, a_clipped: Params, f, norm) -> Params:
        """Pull an adjoint of the clipped gradients back through the global-norm clipping,
        in place: f a + (df/dg . a) g with df/dg = -c / (n + eps)^2 * g / n where the clamp
        is not active (f = 1 is a constant otherwise). No host synchronisation."""
        if f is None:
            return a_clipped
        inner = sum(torch.dot(a.reshape(-1), grads[k].reshape(-1)) for k, a in a_clipped.items())
        clipping = (self.clip_norm / (norm + CLIP_EPS) <= 1.0) & (norm > 0)
        slope = -self.clip_norm / (norm + CLIP_EPS) ** 2 / torch.where(norm > 0, norm, 1.0)
        coef = torch.where(clipping, slope * inner, 0.0)
        for k, a in a_clipped.items():
            for part, g in zip(_chunks(a), _chunks(grads[k])):
                part.mul_(f).add_(g * coef)
        return a_clipped

    def _written_vjp_applies(self, owner: type) -> bool:
        """A subclass that changes the update (its step, update or clipping) is not what
        ``owner``'s written-out VJP differentiates: it gets autograd's."""
        cls = type(self)
        return all(
            getattr(cls, name) is getattr(owner, name) for name in ("step", "update", "clip")
        )

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

    def update_vjp(self, params, grads, state, step, a_params, a_state):
        if not self._written_vjp_applies(SGD):
            return super().update_vjp(params, grads, state, step, a_params, a_state)
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        f, norm = self._clip_scale(grads)
        out = {name: _empty_like(a_params) for name in ("params", "grads", "buf")[: 3 if mu else 2]}
        for k, a_out in a_params.items():
            pieces = map(_chunks, (a_out, out["params"][k], out["grads"][k]))
            if mu:  # the buffer's adjoint in and out
                bufs = zip(*map(_chunks, (a_state["momentum_buffer"][k], out["buf"][k])))
            for a, a_th, a_g in zip(*pieces):
                # theta' = theta - lr d with d = gd (+ mu buf' if nesterov), buf' = mu buf + gd,
                # gd = g + wd theta
                a_gd = a * -lr
                if mu:
                    a_buf1, a_buf0 = next(bufs)
                    a_buf1 = a_buf1 + (a_gd * mu if self.nesterov else a_gd)
                    torch.mul(a_buf1, mu, out=a_buf0)
                    a_gd = a_buf1 + a_gd if self.nesterov else a_buf1
                a_g.copy_(a_gd)
                if wd:
                    torch.add(a, a_gd, alpha=wd, out=a_th)
                else:
                    a_th.copy_(a)
        a_s = {"momentum_buffer": out["buf"]} if mu else {}
        return out["params"], a_s, self._clip_vjp_(grads, out["grads"], f, norm)

    # What follows holds for SGD's own update only: a subclass that changes it keeps g_t.
    @property
    def linear_in_grads(self) -> bool:
        return self.clip_norm is None and self._written_vjp_applies(SGD)

    @property
    def recovers_grads(self) -> bool:
        return self.momentum > 0.0 and not self.weight_decay and self._written_vjp_applies(SGD)

    def grads_for_vjp(self, state, new_state, grads_like, clip):
        if self.linear_in_grads:
            return grads_like
        if not self.recovers_grads:
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

    def update_vjp(self, params, grads, state, step, a_params, a_state):
        if not self._written_vjp_applies(Adam):
            return super().update_vjp(params, grads, state, step, a_params, a_state)
        b1, b2 = self.betas
        bc1, root_bc2 = 1.0 - b1**step, (1.0 - b2**step) ** 0.5
        decay = 1.0 - self.lr * self.weight_decay
        f, norm = self._clip_scale(grads)
        out = {name: _empty_like(a_params) for name in ("params", "m", "v", "grads")}
        for k in a_params:
            ins = (grads[k], state["exp_avg"][k], state["exp_avg_sq"][k], a_params[k])
            ins += (a_state["exp_avg"][k], a_state["exp_avg_sq"][k])
            outs = (out["params"][k], out["m"][k], out["v"][k], out["grads"][k])
            for g, m0, v0, a, a_m1, a_v1, a_th, a_m0, a_v0, a_g in zip(*map(_chunks, ins + outs)):
                if f is not None:
                    g = g * f
                m1 = m0 * b1 + g * (1.0 - b1)
                sq = (v0 * b2).addcmul_(g, g, value=1.0 - b2).sqrt_()
                den = sq / root_bc2 + self.eps
                # theta' = theta decay - (lr / bc1) m1 / den, with den = sqrt(v1) / root_bc2 + eps
                a_over = a * (self.lr / bc1) / den
                a_m1 = a_m1 - a_over
                # d theta' / d v1 = (lr / bc1) m1 / den^2 / (2 sqrt(v1) root_bc2), and 0 where
                # v1 = 0 (safe_sqrt's derivative)
                pos = sq > 0
                a_over.mul_(m1).div_(den).div_(torch.where(pos, sq, 1.0) * (2.0 * root_bc2))
                a_v1 = torch.where(pos, a_over, 0.0).add_(a_v1)
                torch.mul(a_m1, 1.0 - b1, out=a_g).add_(a_v1 * g, alpha=2.0 * (1.0 - b2))
                torch.mul(a_m1, b1, out=a_m0)
                torch.mul(a_v1, b2, out=a_v0)
                torch.mul(a, decay, out=a_th)
        a_s = {"exp_avg": out["m"], "exp_avg_sq": out["v"]}
        return out["params"], a_s, self._clip_vjp_(grads, out["grads"], f, norm)

    # Adam's own update only: a subclass that changes it keeps g_t
    @property
    def recovers_grads(self) -> bool:
        return self._written_vjp_applies(Adam)

    def grads_for_vjp(self, state, new_state, grads_like, clip):
        if not self.recovers_grads:
            return None
        b1 = self.betas[0]
        old, new = state["exp_avg"], new_state["exp_avg"]
        g = {k: (new[k] - b1 * old[k]) / (1.0 - b1) for k in new}
        return g if clip is None else {k: v / clip for k, v in g.items()}
