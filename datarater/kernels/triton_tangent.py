"""Triton versions of the forward-over-reverse blocks of :mod:`.tangent_ops`, for GPUs.

On a GPU the plain-torch references run every block as a dozen small kernels with a temporary
each, and the mixed meta step is bound by those launches. Here each block is one kernel:

* GELU forward and backward (element-wise): one program per ``_ELEM_BLOCK`` elements;
* softmax forward (optionally causal) and backward, LayerNorm forward: one program per row,
  the whole row in one block of the next power of two of its length;
* LayerNorm backward: one program per group of rows, which also sums its rows' share of the
  two parameter-gradient tangents into per-program partials (torch adds the partials up).

Arithmetic is float32 for float32, bfloat16 and float16 inputs; outputs are in the input dtype.
Anything else (float64, rows longer than ``MAX_ROW``, empty or mismatched inputs) goes to the
plain-torch reference, so every function here is a drop-in for its ``tangent_ops`` namesake.
On the CPU the kernels run under ``TRITON_INTERPRET=1`` (slowly: the tests use small shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import tangent_ops as _ops
from .triton_import import on_device, tl, triton

AVAILABLE = triton is not None
MAX_ROW = 16384  # longer rows would need a streamed kernel; the reference takes them
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ELEM_BLOCK = 1024
_LN_BWD_PROGRAMS = 512  # programs of the LayerNorm backward (fewer when there are fewer rows)


if triton is not None:

    @triton.jit
    def _gelu_fwd_kernel(u_ptr, du_ptr, act_ptr, dact_ptr, g1_ptr, g2_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))  # 1 / sqrt(2)
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327  # 1 / sqrt(2 pi)
        g1 = cdf + u * pdf
        ty = act_ptr.dtype.element_ty
        tl.store(act_ptr + offs, (u * cdf).to(ty), mask=mask)
        tl.store(dact_ptr + offs, (g1 * du).to(ty), mask=mask)
        tl.store(g1_ptr + offs, g1.to(ty), mask=mask)
        tl.store(g2_ptr + offs, (pdf * (2.0 - u * u)).to(ty), mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(
        ga_ptr, dga_ptr, g1_ptr, g2_ptr, du_ptr, gu_ptr, dgu_ptr, n, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dga = tl.load(dga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(g1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(g2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ty = gu_ptr.dtype.element_ty
        tl.store(gu_ptr + offs, (ga * g1).to(ty), mask=mask)
        tl.store(dgu_ptr + offs, (dga * g1 + ga * g2 * du).to(ty), mask=mask)

    @triton.jit
    def _softmax_fwd_kernel(
        s_ptr, ds_ptr, a_ptr, da_ptr, L, scale, CAUSAL: tl.constexpr, BLOCK: tl.constexpr
    ):
        """One row: keys past the row's own index within its L x L matrix are masked when
        causal (never loaded; their outputs are written as zeros)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < L
        keep = inside
        if CAUSAL:
            keep = inside & (cols <= row % L)
        base = row * L
        s = tl.load(s_ptr + base + cols, mask=keep, other=float("-inf")).to(tl.float32) * scale
        ds = tl.load(ds_ptr + base + cols, mask=keep, other=0.0).to(tl.float32) * scale
        m = tl.max(s, 0)
        e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m))  # no inf - inf
        a = e / tl.sum(e, 0)
        da = a * (ds - tl.sum(a * ds, 0))
        ty = a_ptr.dtype.element_ty
        tl.store(a_ptr + base + cols, a.to(ty), mask=inside)
        tl.store(da_ptr + base + cols, da.to(ty), mask=inside)

    @triton.jit
    def _softmax_bwd_kernel(
        a_ptr, da_ptr, ga_ptr, dga_ptr, gs_ptr, dgs_ptr, L, scale, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < L
        offs = row * L + cols
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dga = tl.load(dga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rho = tl.sum(a * ga, 0)
        drho = tl.sum(da * ga + a * dga, 0)
        ty = gs_ptr.dtype.element_ty
        tl.store(gs_ptr + offs, (scale * a * (ga - rho)).to(ty), mask=mask)
        tl.store(dgs_ptr + offs, (scale * (da * (ga - rho) + a * (dga - drho))).to(ty), mask=mask)

    @triton.jit
    def _layer_norm_fwd_kernel(
        x_ptr,
        dx_ptr,
        g_ptr,
        dg_ptr,
        b_ptr,
        db_ptr,
        y_ptr,
        dy_ptr,
        xh_ptr,
        dxh_ptr,
        r_ptr,
        m_ptr,
        D,
        eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        offs = row * D + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mu = tl.sum(x, 0) / D
        xc = tl.where(mask, x - mu, 0.0)
        r = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
        xh = xc * r
        m_xdx = tl.sum(xh * dx, 0) / D
        dxh = r * (dx - tl.sum(dx, 0) / D - xh * m_xdx)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        db = tl.load(db_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        ty = y_ptr.dtype.element_ty
        tl.store(y_ptr + offs, (xh * g + b).to(ty), mask=mask)
        tl.store(dy_ptr + offs, (dxh * g + xh * dg + db).to(ty), mask=mask)
        tl.store(xh_ptr + offs, xh.to(ty), mask=mask)
        tl.store(dxh_ptr + offs, dxh.to(ty), mask=mask)
        tl.store(r_ptr + row, r.to(ty))
        tl.store(m_ptr + row, m_xdx.to(ty))

    @triton.jit
    def _layer_norm_bwd_kernel(
        gy_ptr,
        dgy_ptr,
        xh_ptr,
        dxh_ptr,
        r_ptr,
        m_ptr,
        g_ptr,
        dg_ptr,
        gx_ptr,
        dgx_ptr,
        part_ptr,
        N,
        D,
        ROWS,
        BLOCK: tl.constexpr,
    ):
        """Rows [pid ROWS, (pid + 1) ROWS): gx and dgx of each, and the program's column sums
        of dgy xh + gy dxh and of dgy, written to part[pid, 0] and part[pid, 1]."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < D
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        ty = gx_ptr.dtype.element_ty
        for i in range(0, ROWS):
            row = pid.to(tl.int64) * ROWS + i
            mask = cols < tl.where(row < N, D, 0)  # a row past the end: nothing read or written
            offs = row * D + cols
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dgy = tl.load(dgy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xh = tl.load(xh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dxh = tl.load(dxh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            last = tl.minimum(row, N - 1)  # a valid address even past the end
            r = tl.load(r_ptr + last).to(tl.float32)
            m = tl.load(m_ptr + last).to(tl.float32)
            a = gy * g
            da = dgy * g + gy * dg
            m_a = tl.sum(a, 0) / D
            m_axh = tl.sum(a * xh, 0) / D
            m_da = tl.sum(da, 0) / D
            m_dxh = tl.sum(da * xh + a * dxh, 0) / D
            inner = a - m_a - xh * m_axh
            d_inner = da - m_da - dxh * m_axh - xh * m_dxh
            tl.store(gx_ptr + offs, (r * inner).to(ty), mask=mask)
            tl.store(dgx_ptr + offs, (r * (d_inner - r * m * inner)).to(ty), mask=mask)
            acc_w += dgy * xh + gy * dxh
            acc_b += dgy
        base = pid.to(tl.int64) * 2 * D
        tl.store(part_ptr + base + cols, acc_w, mask=cmask)
        tl.store(part_ptr + base + D + cols, acc_b, mask=cmask)


def _fallback(reference: Callable, *args):
    """Every case the kernels do not take ends here (the tests check that they do not)."""
    return reference(*args)


def _ok(*tensors: Tensor, row: int | None = None) -> bool:
    """Whether the kernels take these inputs: triton present, one dtype they handle, one device,
    contiguous, non-empty, and rows no longer than ``MAX_ROW``."""
    first = tensors[0]
    return (
        triton is not None
        and first.dtype in DTYPES
        and first.numel() > 0
        and (row is None or 0 < row <= MAX_ROW)
        and all(
            t.dtype == first.dtype and t.device == first.device and t.is_contiguous()
            for t in tensors
        )
    )


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block: int) -> int:
    """4 elements of a row per thread up to 4096-wide blocks (32 warps), more beyond: wide
    rows spill registers at 16 warps or fewer (the LayerNorm backward keeps six row vectors
    live; checked with ptxas for sm_90; rows near 16384 still spill a little)."""
    return min(32, max(4, block // 128))


def _launch(kernel, grid: tuple[int], like: Tensor, *args, **meta) -> None:
    """Launch ``kernel`` on the GPU that holds ``like``: Triton launches on the current device,
    which need not be the tensors' one."""
    with on_device(like):
        kernel[grid](*args, **meta)


def gelu_fwd_tangent(u: Tensor, du: Tensor):
    """(gelu(u), gelu'(u) du, gelu'(u), gelu''(u)) for the exact (erf) GELU, in one pass."""
    if not (_ok(u, du) and du.shape == u.shape):
        return _fallback(_ops.gelu_fwd_tangent_reference, u, du)
    outs = [torch.empty_like(u) for _ in range(4)]
    n = u.numel()
    _launch(_gelu_fwd_kernel, (triton.cdiv(n, _ELEM_BLOCK),), u, u, du, *outs, n, BLOCK=_ELEM_BLOCK)
    return tuple(outs)


def gelu_bwd_tangent(ga: Tensor, dga: Tensor, g1: Tensor, g2: Tensor, du: Tensor):
    """(ga gelu', dga gelu' + ga gelu'' du) in one pass."""
    args = (ga, dga, g1, g2, du)
    if not (_ok(*args) and all(t.shape == ga.shape for t in args)):
        return _fallback(_ops.gelu_bwd_tangent_reference, *args)
    gu, dgu = torch.empty_like(ga), torch.empty_like(ga)
    n = ga.numel()
    _launch(
        _gelu_bwd_kernel, (triton.cdiv(n, _ELEM_BLOCK),), ga, *args, gu, dgu, n, BLOCK=_ELEM_BLOCK
    )
    return gu, dgu


def softmax_fwd_tangent(s: Tensor, ds: Tensor, scale: float, causal: bool):
    """a = softmax(scale s) over the last dimension (causally masked if asked: s is then
    [..., L, L]) and its tangent along ds."""
    n = s.shape[-1] if s.dim() else 0
    square = s.dim() >= 2 and s.shape[-2] == n
    if not (_ok(s, ds, row=n) and ds.shape == s.shape and (square or not causal)):
        return _fallback(_ops.softmax_fwd_tangent_reference, s, ds, scale, causal)
    a, da = torch.empty_like(s), torch.empty_like(s)
    block = _block(n)
    _launch(
        _softmax_fwd_kernel, (s.numel() // n,), s, s, ds, a, da, n, float(scale),
        CAUSAL=bool(causal), BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return a, da


def softmax_bwd_tangent(a: Tensor, da: Tensor, ga: Tensor, dga: Tensor, scale: float):
    """Gradient in the raw scores s (scale folded in) and its tangent, in one pass per row."""
    n = a.shape[-1] if a.dim() else 0
    args = (a, da, ga, dga)
    if not (_ok(*args, row=n) and all(t.shape == a.shape for t in args)):
        return _fallback(_ops.softmax_bwd_tangent_reference, *args, scale)
    gs, dgs = torch.empty_like(a), torch.empty_like(a)
    block = _block(n)
    _launch(
        _softmax_bwd_kernel, (a.numel() // n,), a, *args, gs, dgs, n, float(scale),
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return gs, dgs


def layer_norm_fwd_tangent(x, dx, gamma, dgamma, beta, dbeta, eps: float):
    """LayerNorm of rows and its tangent; the third item (xh, dxh, r, mean(xh dx)) is saved
    for the backward, r and the mean shaped [..., 1] as the reference has them."""
    d = x.shape[-1] if x.dim() else 0
    params = (gamma, dgamma, beta, dbeta)
    if not (
        _ok(x, dx, *params, row=d) and dx.shape == x.shape and all(p.shape == (d,) for p in params)
    ):
        return _fallback(_ops.layer_norm_fwd_tangent_reference, x, dx, *params, eps)
    y, dy, xh, dxh = (torch.empty_like(x) for _ in range(4))
    r = x.new_empty((*x.shape[:-1], 1))
    m = torch.empty_like(r)
    block = _block(d)
    _launch(
        _layer_norm_fwd_kernel, (x.numel() // d,), x, x, dx, *params, y, dy, xh, dxh, r, m, d,
        float(eps), BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return y, dy, (xh, dxh, r, m)


def layer_norm_bwd_tangent(gy, dgy, saved, gamma, dgamma):
    """(gx, its tangent, tangent of the gamma gradient, tangent of the beta gradient) for rows
    gy [N, D]; the last two are sums over rows, finished by torch from per-program partials."""
    xh, dxh, r, m = saved
    if gy.dim() != 2 and gy.dim() > 0:  # rows of any leading shape: as one [rows, D] batch
        flat = [t.reshape(-1, t.shape[-1]) for t in (gy, dgy, *saved)]
        gx, dgx, dgw, dgb = layer_norm_bwd_tangent(*flat[:2], tuple(flat[2:]), gamma, dgamma)
        return gx.reshape(gy.shape), dgx.reshape(gy.shape), dgw, dgb
    rows, d = gy.shape
    if not (
        _ok(gy, dgy, xh, dxh, r, m, gamma, dgamma, row=d)
        and all(t.shape == gy.shape for t in (dgy, xh, dxh))
        and r.numel() == rows
        and m.numel() == rows
        and gamma.shape == dgamma.shape == (d,)
    ):
        return _fallback(_ops.layer_norm_bwd_tangent_reference, gy, dgy, saved, gamma, dgamma)
    gx, dgx = torch.empty_like(gy), torch.empty_like(gy)
    per = triton.cdiv(rows, min(rows, _LN_BWD_PROGRAMS))
    programs = triton.cdiv(rows, per)
    part = torch.empty(programs, 2, d, dtype=torch.float32, device=gy.device)
    block = _block(d)
    _launch(
        _layer_norm_bwd_kernel, (programs,), gy,
        gy, dgy, xh, dxh, r, m, gamma, dgamma, gx, dgx, part, rows, d, per,
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    dgw, dgb = part.sum(0).to(gy.dtype)
    return gx, dgx, dgw, dgb
