"""Triton backend of the two cross-entropy primitives (see ``primitives.py``).

One program per row; each streams the row in blocks of ``BLOCK`` columns. The forward keeps a
running max and sum (online softmax), so the row is read once; the directional pass reads the
row (and the direction) once to get ``p . D`` and, when an output is wanted, once more to write
it, in place over the logits if asked. ``forward_grad`` fuses the forward with the gradient for
first-order training: each row is read twice, the second time mostly from L2, and written once.
On the CPU these kernels run under ``TRITON_INTERPRET=1`` (slowly: the tests use small shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .primitives import Primitives
from .triton_import import IMPORT_ERROR as _IMPORT_ERROR
from .triton_import import interpreting, on_device, tl, triton

if triton is not None:

    @triton.jit
    def _row_nll(z_row, t_ptr, row, V, ignore_index, BLOCK: tl.constexpr):
        """lse of a row (streamed once, online max and sum), its target and nll."""
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a masked block: no inf - inf
            s = s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), 0)
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(t_ptr + row)
        valid = y != ignore_index
        z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
        return lse, y, valid, tl.where(valid, lse - z_y, 0.0)

    @triton.jit
    def _ce_forward_kernel(
        z_ptr,
        stride_z,
        t_ptr,
        w_ptr,
        loss_ptr,
        lse_ptr,
        nll_ptr,
        V,
        ignore_index,
        HAS_W: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        lse, y, valid, nll = _row_nll(z_row, t_ptr, row, V, ignore_index, BLOCK)
        loss = nll
        if HAS_W:
            loss = nll * tl.load(w_ptr + row).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(nll_ptr + row, nll)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def _ce_directional_kernel(
        z_ptr,
        stride_z,
        t_ptr,
        lse_ptr,
        d_ptr,
        stride_d,
        ch_ptr,
        cg_ptr,
        dot_ptr,
        out_ptr,
        stride_o,
        V,
        ignore_index,
        HAS_D: tl.constexpr,
        HAS_CH: tl.constexpr,
        HAS_CG: tl.constexpr,
        WANT_OUT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK)
        y = tl.load(t_ptr + row)
        valid = y != ignore_index
        lse = tl.load(lse_ptr + row)
        pd = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        if HAS_D:
            d_row = d_ptr + row * stride_d
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                x = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                d = tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)
                pd += tl.sum(tl.exp(x - lse) * d, 0)
            d_y = tl.load(d_row + tl.where(valid, y, 0)).to(tl.float32)
            tl.store(dot_ptr + row, tl.where(valid, pd - d_y, 0.0))
        if WANT_OUT:
            a = 0.0
            b = 0.0
            if HAS_CH:
                a = tl.load(ch_ptr + row)
            if HAS_CG:
                b = tl.load(cg_ptr + row)
            a = tl.where(valid, a, 0.0)
            b = tl.where(valid, b, 0.0)
            o_row = out_ptr + row * stride_o
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                x = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                p = tl.exp(x - lse)
                val = b * p
                if HAS_D:
                    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
                    val += a * p * (d.to(tl.float32) - pd)
                val -= tl.where(offs == y, b, 0.0)
                tl.store(o_row + offs, val.to(o_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_fused_kernel(
        z_ptr,
        stride_z,
        t_ptr,
        c_ptr,
        loss_ptr,
        lse_ptr,
        nll_ptr,
        g_ptr,
        stride_g,
        V,
        ignore_index,
        BLOCK: tl.constexpr,
    ):
        """Forward and gradient of one row: pass 1 streams the row for lse, pass 2 walks it
        backwards (the blocks read last are the likeliest still in L2) writing
        ``c * (p - e_y)``, possibly over the logits."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        g_row = g_ptr + row * stride_g
        lse, y, valid, nll = _row_nll(z_row, t_ptr, row, V, ignore_index, BLOCK)
        c = tl.where(valid, tl.load(c_ptr + row).to(tl.float32), 0.0)
        tl.store(lse_ptr + row, lse)
        tl.store(nll_ptr + row, nll)
        tl.store(loss_ptr + row, c * nll)
        n_blocks = tl.cdiv(V, BLOCK)
        for i in range(0, n_blocks):
            offs = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            val = c * tl.exp(x - lse) - tl.where(offs == y, c, 0.0)
            tl.store(g_row + offs, val.to(g_row.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    cap = 1 << 16 if interpreting() else 8192
    return max(16, min(cap, triton.next_power_of_2(max(v, 1))))


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _row_outputs(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """loss, lse and nll: float32 [N], zero (what rows of no columns get)."""
    loss = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return loss, torch.zeros_like(loss), torch.zeros_like(loss)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class TritonPrimitives(Primitives):
    name = "triton"

    def reason_unsupported(self, logits: Tensor) -> str | None:
        if triton is None:
            return f"triton is not installed ({_IMPORT_ERROR})"
        if logits.device.type != "cuda" and not interpreting():
            return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the triton backend takes float32, bfloat16 or float16, got {logits.dtype}"
        if logits.dim() == 2 and logits.shape[1] > 1 and logits.stride(1) != 1:
            return "the triton backend needs rows with unit stride (call .contiguous())"
        return None

    def forward(self, logits, targets, weights, ignore_index):
        n, v = logits.shape
        loss, lse, nll = _row_outputs(logits)
        if n == 0 or v == 0:
            return loss, lse, nll
        w = _f32(weights)
        block = _block(v)
        with on_device(logits):
            _ce_forward_kernel[(n,)](
                logits,
                logits.stride(0),
                targets.contiguous(),
                w if w is not None else loss,
                loss,
                lse,
                nll,
                v,
                ignore_index,
                HAS_W=w is not None,
                BLOCK=block,
                num_warps=_warps(block),
            )
        return loss, lse, nll

    def directional(
        self, logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out=None
    ):
        n, v = logits.shape
        dot = torch.zeros(n, dtype=torch.float32, device=logits.device)
        res = None
        if want_out:
            res = out if out is not None else torch.empty_like(logits)
        if n == 0 or v == 0:
            return dot, (res.zero_() if res is not None else None)
        if direction is not None:
            direction = direction.to(logits.dtype)
            if direction.stride(1) != 1:
                direction = direction.contiguous()
        ch, cg = _f32(coef_h), _f32(coef_g)
        block = _block(v)
        with on_device(logits):
            _ce_directional_kernel[(n,)](
                logits,
                logits.stride(0),
                targets.contiguous(),
                _f32(lse),
                direction if direction is not None else logits,
                direction.stride(0) if direction is not None else 0,
                ch if ch is not None else dot,
                cg if cg is not None else dot,
                dot,
                res if res is not None else logits,
                res.stride(0) if res is not None else 0,
                v,
                ignore_index,
                HAS_D=direction is not None,
                HAS_CH=ch is not None,
                HAS_CG=cg is not None,
                WANT_OUT=want_out,
                BLOCK=block,
                num_warps=_warps(block),
            )
        return dot, res

    def forward_grad(self, logits, targets, coef, ignore_index, out):
        n, v = logits.shape
        loss, lse, nll = _row_outputs(logits)
        if n == 0 or v == 0:
            return loss, lse, nll, out.zero_()
        block = _block(v)
        with on_device(logits):
            _ce_fused_kernel[(n,)](
                logits,
                logits.stride(0),
                targets.contiguous(),
                _f32(coef),
                loss,
                lse,
                nll,
                out,
                out.stride(0),
                v,
                ignore_index,
                BLOCK=block,
                num_warps=_warps(block),
            )
        return loss, lse, nll, out


TRITON = TritonPrimitives()
