"""Flash attention in Triton, every pass a meta-gradient needs: the forward (with its tangent
when asked), the backward (with its tangent when asked), one kernel per pass and loop order.

The same passes, with the same arguments, as :mod:`.attention_blockwise` (whose docstring
has the notation; docs/attention.md the maths), on CUDA tensors or on the CPU under
``TRITON_INTERPRET=1``:

* ``_forward_kernel``: one program per block of queries streams over the key blocks with an
  online softmax in base 2, writing ``o`` as ``[B, L, H, D]`` and each row's log-sum-exp; with
  ``TANGENT`` it also accumulates ``rowsum(P tS)`` and ``(P tS) v + P tv`` under the same
  rescaling, so the output's tangent costs no second pass.
* ``_backward_kv_kernel``: one program per block of keys of one key/value head loops over the
  query heads of its group and their query blocks, accumulating ``gk, gv`` (and their
  tangents) in registers.
* ``_backward_q_kernel``: one program per block of queries loops over the key blocks,
  accumulating ``gq`` (and its tangent). No atomics: each gradient has one writer.

No pass stores a score tile in memory. The double backward (the oracle's reverse over
reverse) runs the blockwise torch pass on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention_blockwise import Mask
from .triton_import import interpreting, on_device, tl, triton

HEAD_SIZES = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GRID_Y = 65535  # the launch grid's second axis runs over batch x heads

# Block shapes (BLOCK_M, BLOCK_N, warps, stages). The forward's first 16-bit / float32 entries
# are its fixed choice; the others are the autotuner's candidates for inference. Float32
# blocks take twice the shared memory: at head size 128 only small ones fit Hopper's 227 KiB
# (checked by compiling for sm_90 in tests/triton_aot.py). The interpreter's are small.
FORWARD_16 = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4))
FORWARD_32 = ((32, 32, 4, 2), (64, 32, 4, 2))
INTERPRETER = (16, 16, 4, 1)


def backward_config(d: int, wide: bool, tangent: bool) -> tuple[int, int, int, int]:
    """Blocks of the two backward kernels: the tangent passes hold twice the accumulators."""
    if interpreting():
        return INTERPRETER
    if wide or tangent:
        return (32, 32, 4, 2) if d >= 128 or (wide and tangent) else (64, 32, 4, 2)
    return (64, 64, 4, 2) if d <= 64 else (32, 64, 4, 2)


def reason_unsupported(q: Tensor, k: Tensor) -> str | None:
    """Why the kernels cannot take these inputs (None: they can); the device comes last."""
    if triton is None:
        return "triton is not installed"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernels take {DTYPES})"
    if q.shape[-1] not in HEAD_SIZES:
        return f"head size {q.shape[-1]} (the kernels take {HEAD_SIZES})"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return f"batch x heads = {q.shape[0] * q.shape[1]} (at most {MAX_GRID_Y})"
    if q.device.type != "cuda" and not interpreting():
        return "the Triton kernels run on CUDA tensors (or the CPU under TRITON_INTERPRET=1)"
    return None


if triton is not None:

    @triton.jit
    def _dot(a, b, F32: tl.constexpr):
        """``a @ b`` accumulated in float32; ``F32`` multiplies in float32 without TF32
        rounding (float32 inputs, and the interpreter, which gets 16-bit products wrong)."""
        if F32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _load(ptr, sb, sh, sl, b, h, idx, dims, L, EVEN: tl.constexpr):
        """Rows ``idx`` of one (batch, head) of a ``[B, H, L, D]`` tensor; zeros past L."""
        ptrs = ptr + b * sb + h * sh + idx[:, None].to(tl.int64) * sl + dims[None, :]
        if EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=idx[:, None] < L, other=0.0)
        return x

    @triton.jit
    def _store(ptr, sb, sh, sl, b, h, idx, dims, L, x, EVEN: tl.constexpr):
        ptrs = ptr + b * sb + h * sh + idx[:, None].to(tl.int64) * sl + dims[None, :]
        if EVEN:
            tl.store(ptrs, x.to(ptr.dtype.element_ty))
        else:
            tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=idx[:, None] < L)

    @triton.jit
    def _load_row(ptr, bh, idx, L, EVEN: tl.constexpr):
        """One value per query of a contiguous ``[B, H, L]`` float32 tensor."""
        if EVEN:
            x = tl.load(ptr + bh * L + idx)
        else:
            x = tl.load(ptr + bh * L + idx, mask=idx < L, other=0.0)
        return x

    @triton.jit
    def _allowed(rows, cols, L, keep_ptr, s_keep, b, HAS_KEEP: tl.constexpr,
                 CAUSAL: tl.constexpr):  # fmt: skip
        allowed = (rows < L)[:, None] & (cols < L)[None, :]
        if HAS_KEEP:
            keep = tl.load(keep_ptr + b * s_keep + cols, mask=cols < L, other=0)
            allowed = allowed & (keep != 0)[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None])
        return allowed

    @triton.jit
    def _query_block(H, G, BLOCK_M: tl.constexpr):
        """This program's block of queries: (first row, b * H + h, b, h, key head, rows)."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)  # (int64: bh * L * D may pass 2^31)
        b = bh // H
        h = bh % H
        return start_m, bh, b, h, h // G, start_m + tl.arange(0, BLOCK_M)

    @triton.jit
    def _probabilities(q, k, lse2, rows, cols, L, keep_ptr, s_keep, b, scale_log2,
                       HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr,
                       F32: tl.constexpr):  # fmt: skip
        """``P = exp(S - lse)`` of one tile from the saved log-sum-exp (in base 2)."""
        p = tl.math.exp2(_dot(q, tl.trans(k), F32) * scale_log2 - lse2[:, None])
        if HAS_KEEP or CAUSAL or not EVEN:
            allowed = _allowed(rows, cols, L, keep_ptr, s_keep, b, HAS_KEEP, CAUSAL)
            p = tl.where(allowed, p, 0.0)
        return p

    @triton.heuristics(
        {"EVEN": lambda a: a["L"] % a["BLOCK_M"] == 0 and a["L"] % a["BLOCK_N"] == 0}
    )
    @triton.jit
    def _forward_kernel(
        q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, to_ptr, lse_ptr, tlse_ptr, keep_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
        stqb, stqh, stql, stkb, stkh, stkl, stvb, stvh, stvl,
        sob, soh, sol, s_keep, H, G, L, scale,
        D: tl.constexpr, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
        TANGENT: tl.constexpr, WRITE_LSE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        start_m, bh, b, h, hk, rows = _query_block(H, G, BLOCK_M)
        dims = tl.arange(0, D)
        scale_log2 = scale * 1.4426950408889634
        q = _load(q_ptr, sqb, sqh, sql, b, h, rows, dims, L, EVEN)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if TANGENT:
            tq = _load(tq_ptr, stqb, stqh, stql, b, h, rows, dims, L, EVEN)
            t_i = tl.zeros([BLOCK_M], tl.float32)
            tacc = tl.zeros([BLOCK_M, D], tl.float32)
        end = tl.minimum(L, start_m + BLOCK_M) if CAUSAL else L
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load(k_ptr, skb, skh, skl, b, hk, cols, dims, L, EVEN)
            v = _load(v_ptr, svb, svh, svl, b, hk, cols, dims, L, EVEN)
            s = _dot(q, tl.trans(k), DOT_F32) * scale_log2
            if HAS_KEEP or CAUSAL or not EVEN:
                allowed = _allowed(rows, cols, L, keep_ptr, s_keep, b, HAS_KEEP, CAUSAL)
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet
            p = tl.math.exp2(s - ref[:, None])
            alpha = tl.math.exp2(m_i - ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
            if TANGENT:
                tk = _load(tk_ptr, stkb, stkh, stkl, b, hk, cols, dims, L, EVEN)
                tv = _load(tv_ptr, stvb, stvh, stvl, b, hk, cols, dims, L, EVEN)
                ts = (_dot(tq, tl.trans(k), DOT_F32) + _dot(q, tl.trans(tk), DOT_F32)) * scale
                ps = p * ts
                t_i = t_i * alpha + tl.sum(ps, 1)
                tacc = tacc * alpha[:, None] + _dot(ps.to(v.dtype), v, DOT_F32)
                tacc += _dot(p.to(tv.dtype), tv, DOT_F32)
            m_i = m_new
        inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # no key: zeros
        out = acc * inv[:, None]
        _store(o_ptr, sob, soh, sol, b, h, rows, dims, L, out, EVEN)
        ref = tl.where(m_i == float("-inf"), 0.0, m_i)
        if WRITE_LSE:
            log_l = tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))
            lse = tl.where(l_i > 0.0, (ref + log_l) / 1.4426950408889634, float("-inf"))
            tl.store(lse_ptr + bh * L + rows, lse, mask=rows < L)
        if TANGENT:
            mu = t_i * inv
            _store(to_ptr, sob, soh, sol, b, h, rows, dims, L,
                   tacc * inv[:, None] - mu[:, None] * out, EVEN)  # fmt: skip
            tl.store(tlse_ptr + bh * L + rows, mu, mask=rows < L)

    @triton.heuristics(
        {"EVEN": lambda a: a["L"] % a["BLOCK_M"] == 0 and a["L"] % a["BLOCK_N"] == 0}
    )
    @triton.jit
    def _backward_kv_kernel(
        q_ptr, k_ptr, v_ptr, go_ptr, tq_ptr, tk_ptr, tv_ptr, tgo_ptr,
        lse_ptr, delta_ptr, tlse_ptr, tdelta_ptr, keep_ptr,
        gk_ptr, gv_ptr, tgk_ptr, tgv_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl,
        stqb, stqh, stql, stkb, stkh, stkl, stvb, stvh, stvl, stgb, stgh, stgl,
        s_keep, H, G, L, scale,
        D: tl.constexpr, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
        TANGENT: tl.constexpr, PRIMAL: tl.constexpr, HAS_TLSE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """gk, gv (and tangents) of one key block, over the G query heads that read it. The
        outputs are contiguous [B, Hk, L, D]; ``tdelta`` is always given with ``TANGENT``."""
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1)
        hk_count = H // G
        b = (bhk // hk_count).to(tl.int64)
        hk = (bhk % hk_count).to(tl.int64)
        cols = start_n + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        scale_log2 = scale * 1.4426950408889634
        k = _load(k_ptr, skb, skh, skl, b, hk, cols, dims, L, EVEN)
        v = _load(v_ptr, svb, svh, svl, b, hk, cols, dims, L, EVEN)
        gk = tl.zeros([BLOCK_N, D], tl.float32)
        gv = tl.zeros([BLOCK_N, D], tl.float32)
        if TANGENT:
            tk = _load(tk_ptr, stkb, stkh, stkl, b, hk, cols, dims, L, EVEN)
            tv = _load(tv_ptr, stvb, stvh, stvl, b, hk, cols, dims, L, EVEN)
            tgk = tl.zeros([BLOCK_N, D], tl.float32)
            tgv = tl.zeros([BLOCK_N, D], tl.float32)
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
        for g in range(0, G):
            h = hk * G + g
            bh = b * H + h
            for start_m in range(lo, L, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                q = _load(q_ptr, sqb, sqh, sql, b, h, rows, dims, L, EVEN)
                go = _load(go_ptr, sgb, sgh, sgl, b, h, rows, dims, L, EVEN)
                lse = _load_row(lse_ptr, bh, rows, L, EVEN)
                lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
                p = _probabilities(q, k, lse2, rows, cols, L, keep_ptr, s_keep, b, scale_log2,
                                   HAS_KEEP, CAUSAL, EVEN, DOT_F32)  # fmt: skip
                dp = (
                    _dot(go, tl.trans(v), DOT_F32)
                    - _load_row(delta_ptr, bh, rows, L, EVEN)[:, None]
                )
                ds = p * dp
                if PRIMAL:
                    gv += _dot(tl.trans(p).to(go.dtype), go, DOT_F32)
                    gk += _dot(tl.trans(ds).to(q.dtype), q, DOT_F32)
                if TANGENT:
                    tq = _load(tq_ptr, stqb, stqh, stql, b, h, rows, dims, L, EVEN)
                    tgo = _load(tgo_ptr, stgb, stgh, stgl, b, h, rows, dims, L, EVEN)
                    ts = (_dot(tq, tl.trans(k), DOT_F32) + _dot(q, tl.trans(tk), DOT_F32)) * scale
                    if HAS_TLSE:
                        ts -= _load_row(tlse_ptr, bh, rows, L, EVEN)[:, None]
                    tp = p * ts
                    tdp = _dot(tgo, tl.trans(v), DOT_F32) + _dot(go, tl.trans(tv), DOT_F32)
                    tdp -= _load_row(tdelta_ptr, bh, rows, L, EVEN)[:, None]
                    tds = tp * dp + p * tdp
                    tgv += _dot(tl.trans(tp).to(go.dtype), go, DOT_F32)
                    tgv += _dot(tl.trans(p).to(tgo.dtype), tgo, DOT_F32)
                    tgk += _dot(tl.trans(tds).to(q.dtype), q, DOT_F32)
                    tgk += _dot(tl.trans(ds).to(tq.dtype), tq, DOT_F32)
        out_h = b * hk_count + hk  # the outputs: contiguous [B, Hk, L, D]
        if PRIMAL:
            _store(gk_ptr, 0, L * D, D, 0, out_h, cols, dims, L, gk * scale, EVEN)
            _store(gv_ptr, 0, L * D, D, 0, out_h, cols, dims, L, gv, EVEN)
        if TANGENT:
            _store(tgk_ptr, 0, L * D, D, 0, out_h, cols, dims, L, tgk * scale, EVEN)
            _store(tgv_ptr, 0, L * D, D, 0, out_h, cols, dims, L, tgv, EVEN)

    @triton.heuristics(
        {"EVEN": lambda a: a["L"] % a["BLOCK_M"] == 0 and a["L"] % a["BLOCK_N"] == 0}
    )
    @triton.jit
    def _backward_q_kernel(
        q_ptr, k_ptr, v_ptr, go_ptr, tq_ptr, tk_ptr, tv_ptr, tgo_ptr,
        lse_ptr, delta_ptr, tlse_ptr, tdelta_ptr, keep_ptr, gq_ptr, tgq_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl,
        stqb, stqh, stql, stkb, stkh, stkl, stvb, stvh, stvl, stgb, stgh, stgl,
        s_keep, H, G, L, scale,
        D: tl.constexpr, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
        TANGENT: tl.constexpr, PRIMAL: tl.constexpr, HAS_TLSE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """gq (and its tangent) of one query block; the outputs are contiguous [B, H, L, D]."""
        start_m, bh, b, h, hk, rows = _query_block(H, G, BLOCK_M)
        dims = tl.arange(0, D)
        scale_log2 = scale * 1.4426950408889634
        q = _load(q_ptr, sqb, sqh, sql, b, h, rows, dims, L, EVEN)
        go = _load(go_ptr, sgb, sgh, sgl, b, h, rows, dims, L, EVEN)
        lse = _load_row(lse_ptr, bh, rows, L, EVEN)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        delta = _load_row(delta_ptr, bh, rows, L, EVEN)
        gq = tl.zeros([BLOCK_M, D], tl.float32)
        if TANGENT:
            tq = _load(tq_ptr, stqb, stqh, stql, b, h, rows, dims, L, EVEN)
            tgo = _load(tgo_ptr, stgb, stgh, stgl, b, h, rows, dims, L, EVEN)
            tdelta = _load_row(tdelta_ptr, bh, rows, L, EVEN)
            if HAS_TLSE:
                tlse = _load_row(tlse_ptr, bh, rows, L, EVEN)
            tgq = tl.zeros([BLOCK_M, D], tl.float32)
        end = tl.minimum(L, start_m + BLOCK_M) if CAUSAL else L
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load(k_ptr, skb, skh, skl, b, hk, cols, dims, L, EVEN)
            v = _load(v_ptr, svb, svh, svl, b, hk, cols, dims, L, EVEN)
            p = _probabilities(q, k, lse2, rows, cols, L, keep_ptr, s_keep, b, scale_log2,
                               HAS_KEEP, CAUSAL, EVEN, DOT_F32)  # fmt: skip
            dp = _dot(go, tl.trans(v), DOT_F32) - delta[:, None]
            ds = p * dp
            if PRIMAL:
                gq += _dot(ds.to(k.dtype), k, DOT_F32)
            if TANGENT:
                tk = _load(tk_ptr, stkb, stkh, stkl, b, hk, cols, dims, L, EVEN)
                tv = _load(tv_ptr, stvb, stvh, stvl, b, hk, cols, dims, L, EVEN)
                ts = (_dot(tq, tl.trans(k), DOT_F32) + _dot(q, tl.trans(tk), DOT_F32)) * scale
                if HAS_TLSE:
                    ts -= tlse[:, None]
                tp = p * ts
                tdp = _dot(tgo, tl.trans(v), DOT_F32) + _dot(go, tl.trans(tv), DOT_F32)
                tds = tp * dp + p * (tdp - tdelta[:, None])
                tgq += _dot(tds.to(k.dtype), k, DOT_F32) + _dot(ds.to(tk.dtype), tk, DOT_F32)
        if PRIMAL:
            _store(gq_ptr, 0, L * D, D, 0, bh, rows, dims, L, gq * scale, EVEN)
        if TANGENT:
            _store(tgq_ptr, 0, L * D, D, 0, bh, rows, dims, L, tgq * scale, EVEN)

    _tuned_forward_kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in FORWARD_16 + FORWARD_32
        ],
        key=["L", "D", "G", "HAS_KEEP", "CAUSAL", "DOT_F32", "TANGENT", "WRITE_LSE"],
        prune_configs_by={
            "early_config_prune": lambda configs, named_args, **kw: [
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in (FORWARD_32 if named_args["q_ptr"].element_size() == 4 else FORWARD_16)
            ]
        },
    )(_forward_kernel)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a ``[B, H, L, D]`` tensor with unit stride in D."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit(x: Tensor) -> Tensor:
    """``x`` with unit stride in D."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _tangent(x: Tensor | None, like: Tensor, wanted: bool) -> Tensor:
    """A tangent as the kernels take it: zeros where not given; where no tangent is computed,
    ``like`` stands in (a pointer never read)."""
    if not wanted:
        return like
    return torch.zeros_like(like) if x is None else _unit(x)


def _rows(x: Tensor | None, like: Tensor) -> Tensor:
    """A per-query ``[B, H, L]`` tensor as contiguous float32 (``like`` where None)."""
    return like if x is None else x.float().contiguous()


def _keep(m: Mask, like: Tensor) -> tuple[Tensor, int]:
    if m.keep is None:
        return like, 0
    keep = m.keep.contiguous().view(torch.uint8)
    return keep, keep.stride(0)


def _common(m: Mask, q: Tensor, k: Tensor, wide: bool) -> dict:
    return dict(D=q.shape[-1], HAS_KEEP=m.keep is not None, CAUSAL=m.causal,
                DOT_F32=interpreting() or wide)  # fmt: skip


def forward(q: Tensor, k: Tensor, v: Tensor, m: Mask, tq=None, tk=None, tv=None,
            block: int | None = None, write_lse: bool = True, tune: bool = False):  # fmt: skip
    """As :func:`.attention_blockwise.forward` (``block`` is ignored: the kernels choose)."""
    b, h, n, d = q.shape
    tangent = tq is not None or tk is not None or tv is not None
    q, k, v = (_unit(x) for x in (q, k, v))
    o = q.new_empty(b, n, h, d)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return (o, lse) if not tangent else (o, lse, torch.zeros_like(o), torch.zeros_like(lse))
    tq, tk, tv = (_tangent(t, x, tangent) for t, x in ((tq, q), (tk, k), (tv, v)))
    to = q.new_empty(b, n, h, d) if tangent else o
    tlse = torch.empty_like(lse) if tangent else lse
    keep, s_keep = _keep(m, q)
    wide = q.dtype == torch.float32
    if tune and not tangent and not interpreting():
        kernel, fixed = _tuned_forward_kernel, {}
    else:
        bm, bn, w, st = INTERPRETER if interpreting() else (FORWARD_32 if wide else FORWARD_16)[0]
        kernel = _forward_kernel
        fixed = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    if tangent and not interpreting():  # twice the accumulators: half the rows
        fixed.update(BLOCK_M=min(64, fixed["BLOCK_M"]), num_stages=2)
    ob = o.transpose(1, 2)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    with on_device(q):
        kernel[grid](
            q, k, v, tq, tk, tv, o, to, lse, tlse, keep,
            *_strides(q), *_strides(k), *_strides(v),
            *_strides(tq), *_strides(tk), *_strides(tv),
            *_strides(ob), s_keep, h, h // k.shape[1], n, m.scale,
            **_common(m, q, k, wide), TANGENT=tangent, WRITE_LSE=write_lse, **fixed,
        )  # fmt: skip
    return (o, lse) if not tangent else (o, lse, to, tlse)


def _backward_launch(q, k, v, lse, go, delta, m: Mask, tangents, primal: bool):
    """Both backward kernels; ``tangents`` is None or (tq, tk, tv, tlse, tgo, tdelta)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    tangent = tangents is not None
    q, k, v, go = (_unit(x) for x in (q, k, v, go))
    tq, tk, tv, tlse, tgo, tdelta = tangents if tangent else (None,) * 6
    tq, tk, tv, tgo = (_tangent(t, x, tangent) for t, x in ((tq, q), (tk, k), (tv, v), (tgo, go)))
    lse, delta = _rows(lse, lse), _rows(delta, delta)
    tdelta = _rows(tdelta, torch.zeros_like(delta)) if tangent else delta
    has_tlse = tlse is not None
    tlse = _rows(tlse, lse)

    def outputs(wanted: bool) -> list[Tensor]:  # stand-ins (never written) where not wanted
        if not wanted:
            return [q, k, v]
        return [torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)] + [
            torch.empty(b, hk, n, d, dtype=q.dtype, device=q.device) for _ in range(2)
        ]

    grads, tgrads = outputs(primal), outputs(tangent)
    if q.numel() == 0:
        return [torch.zeros_like(x) for x in grads], [torch.zeros_like(x) for x in tgrads]
    keep, s_keep = _keep(m, q)
    wide = q.dtype == torch.float32
    bm, bn, w, st = backward_config(d, wide, tangent)
    ptrs = (q, k, v, go, tq, tk, tv, tgo, lse, delta, tlse, tdelta, keep)
    strides = [s for x in (q, k, v, go, tq, tk, tv, tgo) for s in _strides(x)]
    flags = dict(**_common(m, q, k, wide), TANGENT=tangent, PRIMAL=primal, HAS_TLSE=has_tlse,
                 BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)  # fmt: skip
    rest = (s_keep, h, h // hk, n, m.scale)
    with on_device(q):
        _backward_kv_kernel[(triton.cdiv(n, bn), b * hk)](
            *ptrs, grads[1], grads[2], tgrads[1], tgrads[2], *strides, *rest, **flags
        )
        _backward_q_kernel[(triton.cdiv(n, bm), b * h)](
            *ptrs, grads[0], tgrads[0], *strides, *rest, **flags
        )
    return grads, tgrads


def backward(q, k, v, lse, go, delta, m: Mask, block: int | None = None):
    """As :func:`.attention_blockwise.backward`."""
    grads, _ = _backward_launch(q, k, v, lse, go, delta, m, None, True)
    return tuple(grads)


def backward_tangent(q, k, v, lse, go, delta, tq, tk, tv, tlse, tgo, tdelta, m: Mask,
                     primal: bool = False, block: int | None = None):  # fmt: skip
    """As :func:`.attention_blockwise.backward_tangent`."""
    tangents = (tq, tk, tv, tlse, tgo, tdelta)
    grads, tgrads = _backward_launch(q, k, v, lse, go, delta, m, tangents, primal)
    return (*grads, *tgrads) if primal else tuple(tgrads)


def inference(q: Tensor, k: Tensor, v: Tensor, m: Mask, tune: bool) -> Tensor:
    """The output alone (no log-sum-exp kept), autotuned on GPUs when ``tune``."""
    return forward(q, k, v, m, write_lse=False, tune=tune)[0]
