"""The output projection fused with weighted cross-entropy, in row chunks.

``z = h W^T + b`` is never held whole: each chunk of rows is projected, reduced by the
backend's primitives, and dropped. Derivatives follow design.md section 3.1 chunk by chunk:
tangents ``dz = dh W^T + h dW^T + db``; gradients ``gz W``, ``gz^T h``; their tangents
``dgz W + gz dW`` and ``dgz^T h + gz^T dh``. As in ``cross_entropy.py`` the gradient is a
Function of its own (``_LinearGrad``) with a jvp and a backward, so meta-gradients and double
backward work through it, and ``_LinearNLL`` gives the gradient in the weights.

Peak extra memory for first-order use: about ``chunk_bytes`` (see the two strategies below;
for very large N the vocabulary-tile path may hold up to N * D * 4 / 8 bytes instead).
Higher-order uses (jvp of the gradient, double backward) keep float32 accumulators of the
weight's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function, forward_ad

from .cross_entropy import _plain_backward
from .primitives import Primitives, directional

# 256 MiB: on an H200 at N 8192, D 4096, V 131072 bf16 this keeps the row-chunk path (three
# projections, 43.7 ms, 0.5 GB beyond the gradients); 32 MiB stays within 64 MB of extra memory
# through vocabulary tiles at 98.9 ms (bench/RESULTS.md).
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _rows_per_chunk(n: int, v: int, elem: int, chunk_bytes: int) -> int:
    return max(1, min(max(n, 1), chunk_bytes // max(1, v * elem)))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _project(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def _tangent(h, dh, w, dw, db) -> Tensor:
    """dz = dh W^T + h dW^T + db for one chunk (any of the tangents may be None)."""
    dz = None
    if dh is not None:
        dz = dh @ w.T
    if dw is not None:
        dz = h @ dw.T if dz is None else torch.addmm(dz, h, dw.T)
    if db is not None:
        dz = db.expand(h.shape[0], -1).clone() if dz is None else dz + db
    return dz


# First-order gradients hold at most ``chunk_bytes`` of temporaries in one of two ways:
# * row chunks (few of them): each chunk's logits give lse, the loss and the gradient at once;
#   three projections in all, but the weight gradient is accumulated once per chunk, a full
#   read and write of it each time, so this is used only when there are at most
#   ``_FEW_CHUNKS`` chunks (a large ``chunk_bytes``);
# * vocabulary chunks: a first projection gives lse, then each (row block, vocabulary chunk)
#   tile is projected again and its gradient multiplied out at once; four projections, and
#   the weight gradient is accumulated once per row block only. This is the default for large
#   N x V, where memory, not the extra projection, is what limits.
_FEW_CHUNKS = 8


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _few_chunks(n: int, rows: int) -> bool:
    return -(-n // rows) <= _FEW_CHUNKS


def _tile_in_place(cfg) -> bool:
    """Whether ``_tile_grad`` overwrites the tile in place (no float32 copy of it)."""
    return cfg.prim.name in ("cuda", "triton") and cfg.ignore_index < 0


def _tile_grad(z: Tensor, lse: Tensor, coef: Tensor, targets: Tensor, col0: int, cfg) -> Tensor:
    """``coef * (softmax - onehot)`` on the columns [col0, col0 + z.shape[1]) of rows whose
    full lse is known, in z's dtype, without a host synchronisation. On GPUs one pass of the
    backend's directional kernel, in place (targets outside the tile point nowhere)."""
    local = targets - col0
    inside = (local >= 0) & (local < z.shape[1])
    if _tile_in_place(cfg):
        nowhere = -1 if cfg.ignore_index != -1 else -2  # matches no column, is not ignored
        local = torch.where(inside, local, torch.full_like(local, nowhere))
        return cfg.prim.directional(z, local, lse, None, None, coef, cfg.ignore_index, True, z)[1]
    acc = _acc(z)
    c = coef.to(acc)
    g = z.to(acc).sub_(lse.to(acc)[:, None]).exp_().mul_(c[:, None])
    at = torch.where(inside, local, torch.zeros_like(local))[:, None]
    g.scatter_add_(1, at, torch.where(inside, -c, torch.zeros_like(c))[:, None])
    return g.to(z.dtype)


def _grads_by_vocab_chunks(h, w, b, coef, lse, cfg: _Ctx, budget: int, need=(True,) * 3):
    """Gradients of sum_n coef_n nll_n in (h, W, b) given lse (None for those ``need`` says
    nobody wants: a frozen weight costs neither its V x D buffer nor its GEMM). Temporaries:
    a float32 accumulator for a block of rows of gh and one tile of logits (in the inputs'
    dtype, and in float32 where the backend cannot write the tile's gradient in place), within
    ``budget`` bytes unless N is so large that a block of N/8 rows (the rounding bound) or a
    128-column tile exceeds it: at most about N * D * 4 / 8 bytes more."""
    n, d = h.shape
    v = w.shape[0]
    elem = h.element_size()
    acc = _acc(h)
    acc_elem = torch.finfo(acc).bits // 8
    # row blocks of at least N / _FEW_CHUNKS rows: the weight gradient, accumulated in its own
    # dtype, is rounded at most _FEW_CHUNKS times (the hidden-gradient accumulator may then
    # exceed the budget for very large N)
    nb = max(1, min(n, (budget // 2) // max(1, d * acc_elem)), -(-n // _FEW_CHUNKS))
    tile_elem = elem if _tile_in_place(cfg) else elem + acc_elem
    cv = max(1, min(v, (budget // 2) // max(1, nb * tile_elem)))
    if cv >= 128:
        cv -= cv % 128  # matrix-unit friendly widths
    cv = max(cv, min(v, 128))  # never one-column products, whatever the budget
    valid = cfg.targets != cfg.ignore_index
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    gh = torch.empty_like(h) if need[0] else None
    gw = torch.zeros_like(w) if need[1] else None  # one rounding per row block
    gb = None if b is None or not need[2] else torch.zeros(v, dtype=acc, device=w.device)
    for r in _chunks(n, nb):
        hb, lb, cb, tb = h[r], lse[r], coef[r], cfg.targets[r]
        ghb = torch.zeros(hb.shape, dtype=acc, device=h.device) if gh is not None else None
        for c in _chunks(v, cv):
            wc = w[c]
            gz = _tile_grad(_project(hb, wc, None if b is None else b[c]), lb, cb, tb, c.start, cfg)
            if ghb is not None:
                ghb += gz @ wc
            if gw is not None:
                gw[c].addmm_(gz.T, hb)
            if gb is not None:
                gb[c] += gz.sum(0).to(acc)
        if gh is not None:
            gh[r] = ghb.to(h.dtype)
    return gh, gw, None if gb is None else gb.to(b.dtype)


def _grads_by_row_chunks(h, w, b, coef, lse, cfg: _Ctx):
    """The same gradients, one row chunk (all of V) at a time: for few chunks only."""
    gh = torch.empty_like(h)
    gw = torch.zeros_like(w)
    gb = None if b is None else torch.zeros(b.shape, dtype=_acc(b), device=b.device)
    for sl in _chunks(h.shape[0], cfg.rows):
        hc = h[sl]
        z = _project(hc, w, b)
        gz = cfg.prim.directional(
            z, cfg.targets[sl], lse[sl], None, None, coef[sl], cfg.ignore_index, True, out=z
        )[1]
        gh[sl] = gz @ w
        gw.addmm_(gz.T, hc)
        if gb is not None:
            gb += gz.sum(0).to(gb.dtype)
    return gh, gw, None if gb is None else gb.to(b.dtype)


def _first_order_grads(h, w, b, coef, lse, cfg, need=(True,) * 3):
    """The gradients by the path the forward's eager computation takes for these shapes."""
    if _few_chunks(h.shape[0], cfg.rows):
        return _grads_by_row_chunks(h, w, b, coef, lse, cfg)
    return _grads_by_vocab_chunks(h, w, b, coef, lse, cfg, cfg.budget, need)


class _Ctx:
    """Non-tensor settings shared by the three Functions."""

    def __init__(
        self,
        targets: Tensor,
        prim: Primitives,
        ignore_index: int,
        rows: int,
        eager_grad: bool = False,
        budget: int = 0,
        need: tuple[bool, bool, bool] = (True, True, True),
    ):
        self.targets, self.prim, self.ignore_index, self.rows = targets, prim, ignore_index, rows
        self.eager_grad, self.budget = eager_grad, budget
        self.need = need  # which of (h, W, b) the eager gradients are computed for


class _LinearCE(Function):
    """Per-token loss. With ``cfg.eager_grad`` the forward also computes the gradients for an
    upstream gradient of ones (the logits chunk is at hand: no second projection later); the
    backward rescales them when the upstream gradient is uniform, as after ``.sum()`` or a mean,
    and recomputes otherwise."""

    @staticmethod
    def forward(h, w, b, weights, cfg: _Ctx):
        n = h.shape[0]
        loss = h.new_empty(n, dtype=torch.float32 if h.dtype != torch.float64 else h.dtype)
        lse, nll = torch.empty_like(loss), torch.empty_like(loss)
        eager = cfg.eager_grad
        fused = eager and _few_chunks(n, cfg.rows)  # the gradient from the same logits
        if fused:
            gh = torch.empty_like(h) if cfg.need[0] else None
            gw = torch.zeros_like(w) if cfg.need[1] else None  # few chunks: few roundings
            gb = None
            if b is not None and cfg.need[2]:
                gb = torch.zeros(b.shape, dtype=_acc(b), device=b.device)
        z = None
        for sl in _chunks(n, cfg.rows):
            hc, t = h[sl], cfg.targets[sl]
            z = _project(hc, w, b)
            wc = None if weights is None else weights[sl]
            loss[sl], lse[sl], nll[sl] = cfg.prim.forward(z, t, wc, cfg.ignore_index)
            if fused:
                coef = torch.ones_like(lse[sl]) if wc is None else wc.to(lse.dtype)
                gz = cfg.prim.directional(
                    z, t, lse[sl], None, None, coef, cfg.ignore_index, True, out=z
                )[1]
                if gh is not None:
                    gh[sl] = gz @ w
                if gw is not None:
                    gw.addmm_(gz.T, hc)
                if gb is not None:
                    gb += gz.sum(0).to(gb.dtype)
        del z  # the last chunk's logits: not held through the gradient pass
        if not eager:
            return loss, lse, nll, None, None, None
        if not fused:
            coef = torch.ones_like(lse) if weights is None else weights.to(lse.dtype)
            gh, gw, gb = _grads_by_vocab_chunks(h, w, b, coef, lse, cfg, cfg.budget, cfg.need)
            return loss, lse, nll, gh, gw, gb
        return loss, lse, nll, gh, gw, None if gb is None else gb.to(b.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, w, b, weights, cfg = inputs
        _, lse, nll, gh, gw, gb = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # no zero gradients for the side outputs: for gw that would be a weight-sized buffer
        ctx.set_materialize_grads(False)
        ctx.cfg, ctx.has_b, ctx.has_weights = cfg, b is not None, weights is not None
        ctx.eager = (gh, gw, gb) if cfg.eager_grad else None
        ctx.save_for_backward(h, w, b, weights, lse, nll)
        ctx.save_for_forward(h, w, b, weights, lse, nll)

    @staticmethod
    def backward(ctx, g_loss, *_):
        h, w, b, weights, lse, nll = ctx.saved_tensors
        cfg = ctx.cfg
        gh = gw = gb = g_weights = None
        eager, ctx.eager = ctx.eager, None
        if g_loss is None:
            return None, None, None, None, None
        if any(ctx.needs_input_grad[:3]):
            if (
                _plain_backward(g_loss) and g_loss.numel() and bool((g_loss == g_loss[0]).all())
            ):  # as after .sum() or a mean: the gradients for ones, rescaled
                if eager is None or any(
                    x is None for x, want in zip(eager, ctx.needs_input_grad) if want
                ):  # computed now as the forward would have (a second backward is the same)
                    ones = torch.ones_like(lse) if weights is None else weights.to(lse.dtype)
                    eager = _first_order_grads(h, w, b, ones, lse, cfg, cfg.need)
                scale = float(g_loss[0])  # a Python float: the product is rounded once
                gh, gw, gb = (x if x is None or scale == 1.0 else x.mul_(scale) for x in eager)
            else:
                coef = g_loss if not ctx.has_weights else g_loss * weights.to(g_loss.dtype)
                gh, gw, gb = _LinearGrad.apply(h, w, b, coef, lse, cfg)
        if ctx.has_weights and ctx.needs_input_grad[3]:
            g_weights = (g_loss * _LinearNLL.apply(h, w, b, lse, nll, cfg)).to(weights.dtype)
        return gh, gw, gb, g_weights, None

    @staticmethod
    def jvp(ctx, dh, dw, db, d_weights, _):
        h, w, b, weights, lse, nll = ctx.saved_tensors
        cfg = ctx.cfg
        d_loss = torch.zeros_like(nll)
        if dh is not None or dw is not None or db is not None:
            dot = _directional_dot(h, dh, w, dw, b, db, lse, cfg)
            d_loss = dot if not ctx.has_weights else dot * weights.to(dot.dtype)
        if ctx.has_weights and d_weights is not None:
            d_loss = d_loss + d_weights.to(nll.dtype) * nll
        return d_loss, None, None, None, None, None


def _directional_dot(h, dh, w, dw, b, db, lse, cfg: _Ctx) -> Tensor:
    """p . dz - dz_y per row, chunk by chunk."""
    out = torch.zeros_like(lse)
    for sl in _chunks(h.shape[0], cfg.rows):
        hc = h[sl]
        z = _project(hc, w, b)
        dz = _tangent(hc, None if dh is None else dh[sl], w, dw, db)
        if dz is None:
            continue
        out[sl] = directional(
            cfg.prim, z, cfg.targets[sl], lse[sl], dz, None, None, cfg.ignore_index, False
        )[0].to(out.dtype)
    return out


class _LinearNLL(Function):
    """nll per row as a function of (h, W, b); returns the value the forward pass saved."""

    @staticmethod
    def forward(h, w, b, lse, nll, cfg: _Ctx):
        return nll.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, w, b, lse, _, cfg = inputs
        ctx.cfg = cfg
        ctx.save_for_backward(h, w, b, lse)
        ctx.save_for_forward(h, w, b, lse)

    @staticmethod
    def backward(ctx, g):
        h, w, b, lse = ctx.saved_tensors
        gh, gw, gb = _LinearGrad.apply(h, w, b, g, lse, ctx.cfg)
        return gh, gw, gb, None, None, None

    @staticmethod
    def jvp(ctx, dh, dw, db, *_):
        h, w, b, lse = ctx.saved_tensors
        return _directional_dot(h, dh, w, dw, b, db, lse, ctx.cfg)


class _LinearGrad(Function):
    """(h, W, b, c) -> gradients of sum_n c_n nll_n(h W^T + b) in h, W and b."""

    @staticmethod
    def forward(h, w, b, coef, lse, cfg: _Ctx):
        return _first_order_grads(h, w, b, coef, lse, cfg)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, w, b, coef, lse, cfg = inputs
        ctx.cfg = cfg
        ctx.save_for_backward(h, w, b, coef, lse)
        ctx.save_for_forward(h, w, b, coef, lse)

    @staticmethod
    def jvp(ctx, dh, dw, db, dcoef, *_):
        h, w, b, coef, lse = ctx.saved_tensors
        cfg = ctx.cfg
        dgh = torch.zeros_like(h)
        dgw = torch.zeros(
            w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device
        )
        dgb = None if b is None else torch.zeros(b.shape, dtype=dgw.dtype, device=b.device)
        for sl in _chunks(h.shape[0], cfg.rows):
            hc, t, lc = h[sl], cfg.targets[sl], lse[sl]
            dhc = None if dh is None else dh[sl]
            z = _project(hc, w, b)
            dz = _tangent(hc, dhc, w, dw, db)
            dcc = None if dcoef is None else dcoef[sl]
            dgz = directional(
                cfg.prim,
                z,
                t,
                lc,
                dz,
                coef[sl] if dz is not None else None,
                dcc,
                cfg.ignore_index,
                True,
            )[1]
            gz = directional(cfg.prim, z, t, lc, None, None, coef[sl], cfg.ignore_index, True)[1]
            dgh[sl] = dgz @ w if dw is None else torch.addmm(dgz @ w, gz, dw)
            dgw += (dgz.T @ hc).to(dgw.dtype)
            if dhc is not None:
                dgw += (gz.T @ dhc).to(dgw.dtype)
            if dgb is not None:
                dgb += dgz.sum(0).to(dgb.dtype)
        return dgh, dgw.to(w.dtype), None if dgb is None else dgb.to(b.dtype)

    @staticmethod
    def backward(ctx, uh, uw, ub):
        h, w, b, coef, lse = ctx.saved_tensors
        cfg = ctx.cfg
        acc = torch.promote_types(w.dtype, torch.float32)
        g_h = torch.zeros_like(h)
        g_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        g_b = None if b is None else torch.zeros(b.shape, dtype=acc, device=b.device)
        g_coef = torch.zeros_like(coef)
        for sl in _chunks(h.shape[0], cfg.rows):
            hc, t, lc = h[sl], cfg.targets[sl], lse[sl]
            z = _project(hc, w, b)
            gz = directional(cfg.prim, z, t, lc, None, None, coef[sl], cfg.ignore_index, True)[1]
            # cotangent of gz, from gh = gz W, gW = gz^T h and gb = sum gz
            u = _tangent(hc, None if uh is None else uh[sl], w, uw, ub)
            if uh is not None:
                g_w += (gz.T @ uh[sl]).to(acc)
            if uw is not None:
                g_h[sl] += gz @ uw
            if u is None:
                continue
            dot, gzz = directional(cfg.prim, z, t, lc, u, coef[sl], None, cfg.ignore_index, True)
            g_coef[sl] = dot.to(coef.dtype)
            g_h[sl] += gzz @ w
            g_w += (gzz.T @ hc).to(acc)
            if g_b is not None:
                g_b += gzz.sum(0).to(acc)
        return (g_h, g_w.to(w.dtype), None if g_b is None else g_b.to(b.dtype), g_coef, None, None)


def linear_weighted_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "none",
    backend: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    eager_grad: bool | None = None,
) -> Tensor:
    """``weighted_cross_entropy(hidden @ weight.T + bias, ...)`` without an N x V tensor.

    ``hidden`` [N, D], ``weight`` [V, D], ``bias`` [V] or None. Rows are processed in chunks
    whose logits take at most ``chunk_bytes``. ``eager_grad`` (default: when a plain backward
    is likely) computes the gradients in the forward pass while each logits chunk is at hand,
    saving the second projection; higher-order uses recompute as usual.
    """
    from . import _REDUCTIONS, _reduce, select_backend, validate
    from .primitives import _wrapped

    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D = {hidden.shape[1]}, got "
            f"{tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden "
            f"({hidden.dtype}, {hidden.device})"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] of {hidden.dtype}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    n, v = hidden.shape[0], weight.shape[0]
    probe = hidden.new_empty(1, v)  # the logits' dtype and device, without making them
    validate(probe.expand(n, v), targets, weights, ignore_index)
    prim = select_backend(probe, backend)
    rows = _rows_per_chunk(n, v, hidden.element_size(), chunk_bytes)
    if eager_grad is None:
        needs = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        eager_grad = (  # not for float16: a loss scaler's factor comes only at the backward
            torch.is_grad_enabled()
            and needs
            and hidden.dtype != torch.float16
            and not _wrapped(hidden, weight, bias, weights)
            and forward_ad._current_level < 0
        )
    need = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    cfg = _Ctx(targets.contiguous(), prim, ignore_index, rows, eager_grad, chunk_bytes, need)
    loss = _LinearCE.apply(hidden, weight, bias, weights, cfg)[0]
    return _reduce(loss, targets, weights, ignore_index, reduction)
