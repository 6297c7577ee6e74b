"""Flash-style attention passes in plain torch, one tile of queries x keys at a time.

The default on CPUs and the fallback on every device: no pass holds more than one
``[B, H, block, block]`` tile of scores (and its tangent), so memory is linear in L, and every
pass runs in float64 too. The maths of each pass is in docs/attention.md; the notation is:
``S = scale q k^T`` (masked), ``P = exp(S - lse)``, ``go`` the gradient of the output,
``delta = rowsum(go * o) - glse``; a leading ``t`` is a tangent (``tq`` of ``q``), a leading
``g`` a gradient, ``u`` a cotangent of the backward's outputs (double backward).

Layouts: ``q`` is ``[B, H, L, D]``, ``k`` and ``v`` ``[B, Hk, L, D]`` with ``H = G Hk``
(grouped-query attention: ``G`` query heads read each key/value head); every per-row quantity
(``lse``, ``delta``) is ``[B, H, L]``. Inside, queries are viewed as ``[B, Hk, G, L, D]`` and
keys as ``[B, Hk, 1, L, D]``, so one batched matmul serves every group.

Tiles are changed in place only along chains where no op that autograd may record has saved
the tensor being changed (a matmul saves its inputs, ``exp`` its output): these passes also run
inside torch.func transforms and, for the double backward, under a graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 128  # rows and keys per tile: 4 x 2 heads x 128 x 128 floats = 0.5 MiB


@dataclass(frozen=True)
class Mask:
    """Which keys each query may read: ``keep`` ([B, L] bool, None: all) and ``causal``."""

    keep: Tensor | None
    causal: bool
    scale: float


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sums run in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _grouped(x: Tensor, hk: int) -> Tensor:
    """``[B, H, L, *]`` as ``[B, Hk, G, L, *]`` (a view)."""
    return x.unflatten(1, (hk, x.shape[1] // hk))


def _tiles(n: int, causal: bool, block: int) -> Iterator[tuple[slice, list[slice]]]:
    """Each block of queries with the blocks of keys it reads (none past it when causal)."""
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        end = i1 if causal else n
        yield slice(i0, i1), [slice(j0, min(end, j0 + block)) for j0 in range(0, end, block)]


def _pairs(n: int, causal: bool, block: int):
    for rows, cols_list in _tiles(n, causal, block):
        for cols in cols_list:
            yield rows, cols


class _Tiles:
    """One pass's inputs, grouped and cast to the accumulation dtype once, cut into tiles; and
    its masks, built once."""

    def __init__(self, q: Tensor, k: Tensor, m: Mask) -> None:
        self.hk, self.acc, self.m, self.device = k.shape[1], accumulator(q.dtype), m, q.device
        self.dropped = None if m.keep is None else ~m.keep[:, None, None, None, :]
        self.future: dict[tuple[int, int, int], Tensor] = {}

    def grouped(self, x: Tensor | None) -> Tensor | None:  # [B, H, L, *] -> [B, Hk, G, L, *]
        return None if x is None else _grouped(x, self.hk).to(self.acc)

    def keyed(self, x: Tensor | None) -> Tensor | None:  # [B, Hk, L, D] -> [B, Hk, 1, L, D]
        return None if x is None else x[:, :, None].to(self.acc)

    def blocked(self, rows: slice, cols: slice) -> Tensor | None:
        """The tile's entries no query may read, broadcastable to ``[B, Hk, G, r, c]``."""
        blocked = None
        if self.m.causal and cols.stop - 1 > rows.start:  # some key follows some query
            key = (rows.stop - rows.start, cols.stop - cols.start, rows.start - cols.start)
            if key not in self.future:  # (one per tile shape and offset: diagonal tiles share)
                r = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
                c = torch.arange(cols.start, cols.stop, device=self.device)[None, :]
                self.future[key] = c > r
            blocked = self.future[key]
        if self.dropped is not None:
            dropped = self.dropped[..., cols]
            blocked = dropped if blocked is None else dropped | blocked
        return blocked

    def scores(self, qi: Tensor, kj: Tensor, rows: slice, cols: slice) -> Tensor:
        s = (qi @ kj.transpose(-1, -2)).mul_(self.m.scale)
        blocked = self.blocked(rows, cols)
        return s if blocked is None else s.masked_fill_(blocked, float("-inf"))

    def probabilities(self, qi, kj, lse_i: Tensor, rows: slice, cols: slice) -> Tensor:
        """``P = exp(S - lse)`` of one tile (``lse_i`` finite: see ``_finite``)."""
        return self.scores(qi, kj, rows, cols).sub_(lse_i[..., None]).exp_()

    def tangent_scores(self, qi, kj, tqi, tkj) -> Tensor:
        """``scale (tq k^T + q tk^T)``; its masked entries meet P = 0 wherever it is used."""
        ts = tqi @ kj.transpose(-1, -2)
        return ts.add_(qi @ tkj.transpose(-1, -2)).mul_(self.m.scale)


def _finite(lse: Tensor) -> Tensor:
    """lse with -inf (a query with no key) as 0: its scores are all -inf, so P is 0."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def forward(q: Tensor, k: Tensor, v: Tensor, m: Mask, tq=None, tk=None, tv=None,
            block: int | None = None):  # fmt: skip
    """``(o, lse)``, and with tangents also ``(to, tlse)``: online softmax over key blocks.

    ``o`` and ``to`` are ``[B, L, H, D]`` (heads merged by a reshape) in the inputs' dtype;
    ``lse`` and ``tlse`` (the tangent of the log-sum-exp, ``rowsum(P tS)``) are ``[B, H, L]``
    in the accumulation dtype.
    """
    block = block or BLOCK
    b, h, n, d = q.shape
    x = _Tiles(q, k, m)
    tangent = tq is not None
    q5, tq5 = x.grouped(q), x.grouped(tq)
    k5, v5, tk5, tv5 = (x.keyed(t) for t in (k, v, tk, tv))
    o = q.new_empty(b, n, h, d)
    lse = torch.empty(b, h, n, dtype=x.acc, device=q.device)
    to = q.new_empty(b, n, h, d) if tangent else None
    tlse = torch.empty(b, h, n, dtype=x.acc, device=q.device) if tangent else None
    for rows, cols_list in _tiles(n, m.causal, block):
        qi, tqi = q5[:, :, :, rows], None if tq5 is None else tq5[:, :, :, rows]
        mx = l = a = t = ta = None
        for cols in cols_list:
            kj, vj = k5[:, :, :, cols], v5[:, :, :, cols]
            s = x.scores(qi, kj, rows, cols)
            new = s.amax(-1) if mx is None else torch.maximum(mx, s.amax(-1))
            ref = new.masked_fill(torch.isinf(new), 0.0)  # nothing allowed yet: no inf - inf
            p = (s - ref[..., None]).exp_()  # (out of place: amax saved s)
            ps = None
            if tangent:
                ps = p * x.tangent_scores(qi, kj, tqi, tk5[:, :, :, cols])
            if mx is None:  # the first key block: nothing to rescale
                l, a = p.sum(-1), p @ vj
                if tangent:
                    t, ta = ps.sum(-1), (ps @ vj).add_(p @ tv5[:, :, :, cols])
            else:
                alpha = torch.exp(mx - ref)
                l = l.mul_(alpha).add_(p.sum(-1))
                a = a.mul_(alpha[..., None]).add_(p @ vj)
                if tangent:
                    t = t.mul_(alpha).add_(ps.sum(-1))
                    ta = ta.mul_(alpha[..., None]).add_(ps @ vj).add_(p @ tv5[:, :, :, cols])
            mx = new
        inv = torch.where(l > 0, 1.0 / l, 0.0)  # no allowed key: zeros
        oi = a * inv[..., None]
        _grouped(o.transpose(1, 2), x.hk)[:, :, :, rows] = oi.to(o.dtype)
        _grouped(lse, x.hk)[:, :, :, rows] = mx.masked_fill(torch.isinf(mx), 0.0) + torch.log(l)
        if tangent:
            mu = t * inv
            tangent_o = ta * inv[..., None] - mu[..., None] * oi
            _grouped(to.transpose(1, 2), x.hk)[:, :, :, rows] = tangent_o.to(to.dtype)
            _grouped(tlse, x.hk)[:, :, :, rows] = mu
    return (o, lse) if not tangent else (o, lse, to, tlse)


class _Grads:
    """Gradient accumulators for q (``[B, Hk, G, L, D]``), k and v (``[B, Hk, L, D]``)."""

    def __init__(self, q: Tensor, k: Tensor, acc: torch.dtype) -> None:
        hk = k.shape[1]
        self.q = torch.zeros(_grouped(q, hk).shape, dtype=acc, device=q.device)
        self.k = torch.zeros(k.shape, dtype=acc, device=k.device)
        self.v = torch.zeros(k.shape, dtype=acc, device=k.device)

    def add(self, rows: slice, cols: slice, gq=None, gk=None, gv=None) -> None:
        if gq is not None:
            self.q[:, :, :, rows] += gq
        if gk is not None:  # summed over the query heads that share the key head
            self.k[:, :, cols] += gk.sum(2)
        if gv is not None:
            self.v[:, :, cols] += gv.sum(2)

    def out(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q.flatten(1, 2).to(q.dtype), self.k.to(k.dtype), self.v.to(k.dtype)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def backward(q, k, v, lse, go, delta, m: Mask, block: int | None = None):
    """``(gq, gk, gv)`` of the output given its gradient ``go`` (``delta`` as above)."""
    block = block or BLOCK
    x = _Tiles(q, k, m)
    g = _Grads(q, k, x.acc)
    q5, go5, lse5, delta5 = x.grouped(q), x.grouped(go), x.grouped(_finite(lse)), x.grouped(delta)
    k5, v5 = x.keyed(k), x.keyed(v)
    for rows, cols in _pairs(q.shape[2], m.causal, block):
        qi, goi, kj, vj = (
            q5[:, :, :, rows],
            go5[:, :, :, rows],
            k5[:, :, :, cols],
            v5[:, :, :, cols],
        )
        p = x.probabilities(qi, kj, lse5[:, :, :, rows], rows, cols)
        ds = (goi @ _t(vj)).sub_(delta5[:, :, :, rows, None]).mul_(p)
        g.add(rows, cols, (ds @ kj).mul_(m.scale), (_t(ds) @ qi).mul_(m.scale), _t(p) @ goi)
    return g.out(q, k)


def backward_tangent(q, k, v, lse, go, delta, tq, tk, tv, tlse, tgo, tdelta, m: Mask,
                     primal: bool = False, block: int | None = None):  # fmt: skip
    """Tangents ``(tgq, tgk, tgv)`` of the backward, given tangents of all its inputs (None:
    zero); with ``primal``, ``(gq, gk, gv, tgq, tgk, tgv)``."""
    block = block or BLOCK
    x = _Tiles(q, k, m)
    t, g = _Grads(q, k, x.acc), _Grads(q, k, x.acc) if primal else None
    tq, tk, tv, tgo = (z if z is not None else torch.zeros_like(w)
                       for z, w in ((tq, q), (tk, k), (tv, v), (tgo, go)))  # fmt: skip
    q5, go5, tq5, tgo5 = (x.grouped(z) for z in (q, go, tq, tgo))
    lse5, delta5, tlse5, tdelta5 = (x.grouped(z) for z in (_finite(lse), delta, tlse, tdelta))
    k5, v5, tk5, tv5 = (x.keyed(z) for z in (k, v, tk, tv))
    for rows, cols in _pairs(q.shape[2], m.causal, block):
        qi, goi, tqi, tgoi = (z[:, :, :, rows] for z in (q5, go5, tq5, tgo5))
        kj, vj, tkj, tvj = (z[:, :, :, cols] for z in (k5, v5, tk5, tv5))
        p = x.probabilities(qi, kj, lse5[:, :, :, rows], rows, cols)
        ts = x.tangent_scores(qi, kj, tqi, tkj)
        if tlse5 is not None:
            ts = ts.sub_(tlse5[:, :, :, rows, None])
        tp = ts.mul_(p)
        dp = (goi @ _t(vj)).sub_(delta5[:, :, :, rows, None])
        tdp = (tgoi @ _t(vj)).add_(goi @ _t(tvj))
        if tdelta5 is not None:
            tdp = tdp.sub_(tdelta5[:, :, :, rows, None])
        ds, tds = p * dp, (tp * dp).add_(tdp.mul_(p))
        t.add(rows, cols, (tds @ kj).add_(ds @ tkj).mul_(m.scale),
              (_t(tds) @ qi).add_(_t(ds) @ tqi).mul_(m.scale),
              (_t(tp) @ goi).add_(_t(p) @ tgoi))  # fmt: skip
        if primal:
            g.add(rows, cols, (ds @ kj).mul_(m.scale), (_t(ds) @ qi).mul_(m.scale),
                  _t(p) @ goi)  # fmt: skip
    return (*g.out(q, k), *t.out(q, k)) if primal else t.out(q, k)


def double_backward(q, k, v, lse, go, delta, uq, uk, uv, m: Mask, block: int | None = None):
    """The backward's own VJP: cotangents ``(uq, uk, uv)`` of ``(gq, gk, gv)`` pulled back to
    ``(q, k, v)``, the output gradient ``go``, ``lse`` and ``delta``:
    ``(gq, gk, gv, ggo, glse, gdelta)``. Out of place throughout: it may run under a graph."""
    block = block or BLOCK
    x = _Tiles(q, k, m)
    g = _Grads(q, k, x.acc)
    ggo = torch.zeros(_grouped(go, k.shape[1]).shape, dtype=x.acc, device=q.device)
    glse = torch.zeros(_grouped(lse, k.shape[1]).shape, dtype=x.acc, device=q.device)
    gdelta = torch.zeros_like(glse)
    uq, uk, uv = (z if z is not None else torch.zeros_like(w)
                  for z, w in ((uq, q), (uk, k), (uv, v)))  # fmt: skip
    q5, go5, uq5 = (x.grouped(z) for z in (q, go, uq))
    lse5, delta5 = x.grouped(_finite(lse)), x.grouped(delta)
    k5, v5, uk5, uv5 = (x.keyed(z) for z in (k, v, uk, uv))
    for rows, cols in _pairs(q.shape[2], m.causal, block):
        qi, goi, uqi = (z[:, :, :, rows] for z in (q5, go5, uq5))
        kj, vj, ukj, uvj = (z[:, :, :, cols] for z in (k5, v5, uk5, uv5))
        s = (qi @ _t(kj)) * m.scale
        blocked = x.blocked(rows, cols)
        if blocked is not None:
            s = s.masked_fill(blocked, float("-inf"))
        p = torch.exp(s - lse5[:, :, :, rows, None])
        dp = goi @ _t(vj) - delta5[:, :, :, rows, None]
        ds = p * dp
        u_ds = m.scale * (uqi @ _t(kj) + qi @ _t(ukj))
        u_dp = u_ds * p
        gs = p * (u_ds * dp + goi @ _t(uvj))
        ggo[:, :, :, rows] += u_dp @ vj + p @ uvj
        glse[:, :, :, rows] -= gs.sum(-1)
        gdelta[:, :, :, rows] -= u_dp.sum(-1)
        g.add(rows, cols, m.scale * (gs @ kj + ds @ ukj),
              m.scale * (_t(gs) @ qi + _t(ds) @ uqi), _t(u_dp) @ goi)  # fmt: skip
    gq, gk, gv = g.out(q, k)
    return gq, gk, gv, ggo.flatten(1, 2).to(go.dtype), glse.flatten(1, 2), gdelta.flatten(1, 2)
