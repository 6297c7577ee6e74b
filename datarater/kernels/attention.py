"""Inference attention for scoring: one fused Triton kernel (flash-attention style) beside its
plain-torch reference.

Scoring spends about a third of the rater's FLOPs in attention (52 of 151 MFLOP per token for
``rater-70m`` at context 2048). PyTorch's fused attention on Hopper is FlashAttention-2; this
kernel is the same online-softmax algorithm written in Triton, which emits Hopper's
asynchronous matrix instructions, and it writes its output as ``[B, L, H, D]`` so that the
output projection reads it without a transpose copy. Forward only, no gradients: training and
meta-gradients keep the written-out attention (they need forward-mode AD).

``attention(q, k, v, keep=None, causal=False, backend=None)`` takes ``q, k, v`` as
``[B, H, L, D]`` views with unit stride in D (the rater's ``qkv`` split is one) and ``keep``, an
optional ``[B, L]`` boolean mask of the keys that may be attended to (padding excluded), and
returns ``[B, L, H, D]``. ``backend="triton"`` runs the kernel (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), ``"torch"`` the reference; ``None`` picks Triton where it can run
and the shapes suit it (head size 16 to 256, a power of two; 16-bit or float32 inputs), else
the reference. Queries whose keys are all masked get zeros (the reference gives the same).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .triton_import import interpreting, on_device, tl, triton

BACKENDS = ("torch", "triton")
HEAD_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # the launch grid's second axis runs over batch x heads


def _check(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention takes q, k, v of one shape [B, H, L, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if keep is not None:
        b, _, n, _ = q.shape
        if keep.shape != (b, n) or keep.dtype != torch.bool or keep.device != q.device:
            raise ValueError(
                f"keep must be a bool tensor [B, L] = [{b}, {n}] on {q.device}, got "
                f"{keep.dtype} {tuple(keep.shape)} on {keep.device}"
            )


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None, causal: bool = False
) -> Tensor:
    """The plain-torch definition, accumulated in at least float32: ``[B, L, H, D]``."""
    _check(q, k, v, keep)
    acc = torch.promote_types(q.dtype, torch.float32)
    n = q.shape[2]
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] if keep is None else allowed & keep[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key: zeros
    return (p @ v.to(acc)).to(q.dtype).transpose(1, 2).contiguous()


def reason_unsupported(q: Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs (None: it can). The device comes last:
    the other reasons hold on every device."""
    if triton is None:
        return "triton is not installed"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the kernel takes {_DTYPES})"
    if q.shape[-1] not in HEAD_SIZES:
        return f"head size {q.shape[-1]} (the kernel takes {HEAD_SIZES})"
    if q.stride(-1) != 1:
        return "q, k, v need unit stride in the head dimension"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"batch x heads = {q.shape[0] * q.shape[1]} (at most {_MAX_GRID_Y})"
    if q.device.type != "cuda" and not interpreting():
        return "the Triton kernel runs on CUDA tensors (or the CPU under TRITON_INTERPRET=1)"
    return None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None = None,
    causal: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Softmax attention of ``[B, H, L, D]`` inputs into ``[B, L, H, D]`` (see the module)."""
    _check(q, k, v, keep)
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    why = reason_unsupported(q) if backend != "torch" else "asked for"
    if why is None and (k.stride(-1) != 1 or v.stride(-1) != 1):
        why = "q, k, v need unit stride in the head dimension"
    if why is not None:
        if backend == "triton":
            raise ValueError(f"the triton attention backend cannot run: {why}")
        return attention_reference(q, k, v, keep, causal)
    return _attention_op(q, k, v, keep, causal)


# One opaque operator to torch.compile (a traced call into the autotuned kernel would break the
# graph); its fake implementation gives the output's shape.
@torch.library.custom_op("datarater::triton_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool) -> Tensor:
    return _triton_attention(q, k, v, keep, causal)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool) -> Tensor:
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d)


# Block shapes tried by the autotuner on GPUs (BLOCK_M, BLOCK_N, warps, stages), for 16-bit
# and for float32 inputs (whose blocks take twice the shared memory: at head size 128 only
# these fit Hopper's 227 KiB, checked by compiling for sm_90); the first of each is the fixed
# choice when tuning is off (DATARATER_ATTENTION_AUTOTUNE=0, used by the GPU tests to spare
# compilations). The interpreter's is small.
_CONFIGS_16 = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4))
_CONFIGS_32 = ((32, 32, 4, 2), (64, 32, 4, 2))  # the first spills least (ptxas, Triton 3.6)
_INTERPRETER_CONFIG = (16, 16, 4, 1)


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's candidates for these inputs' element size."""
    wide = named_args["q_ptr"].element_size() == 4
    keep = _CONFIGS_32 if wide else _CONFIGS_16
    return [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep
    ]


def _tuning() -> bool:
    return os.environ.get("DATARATER_ATTENTION_AUTOTUNE", "1") != "0" and not interpreting()


if triton is not None:

    @triton.heuristics(
        {"EVEN": lambda a: a["L"] % a["BLOCK_M"] == 0 and a["L"] % a["BLOCK_N"] == 0}
    )
    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, keep_ptr,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, s_keep,
        H, L, scale_log2,
        D: tl.constexpr, HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_M queries of one (batch, head), streamed over all keys with an
        online softmax in base 2 (the scale folded into one multiply). ``EVEN`` (L a multiple
        of both blocks) drops the bounds masks; ``DOT_F32`` multiplies in float32 without TF32
        rounding (float32 inputs; and Triton's CPU interpreter gets 16-bit products wrong)."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = start_m + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        q_ptrs = q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sql + dims[None, :]
        if EVEN:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=rows[:, None] < L, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        end = tl.minimum(L, start_m + BLOCK_M) if CAUSAL else L
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = k_base + cols[:, None].to(tl.int64) * skl + dims[None, :]
            v_ptrs = v_base + cols[:, None].to(tl.int64) * svl + dims[None, :]
            if EVEN:
                k = tl.load(k_ptrs)
                vb = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=cols[:, None] < L, other=0.0)
                vb = tl.load(v_ptrs, mask=cols[:, None] < L, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            else:
                s = tl.dot(q, tl.trans(k)) * scale_log2
            if HAS_KEEP or CAUSAL or not EVEN:
                allowed = (cols < L)[None, :]
                if HAS_KEEP:
                    keep = tl.load(keep_ptr + b * s_keep + cols, mask=cols < L, other=0)
                    allowed = allowed & (keep != 0)[None, :]
                if CAUSAL:
                    allowed = allowed & (cols[None, :] <= rows[:, None])
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: no inf - inf
            p = tl.math.exp2(s - ref[:, None])
            alpha = tl.math.exp2(m_i - ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(
                    p.to(vb.dtype).to(tl.float32), vb.to(tl.float32), input_precision="ieee"
                )
            else:
                pv = tl.dot(p.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no allowed key: zeros
        o_ptrs = o_ptr + b * sob + h * soh + rows[:, None].to(tl.int64) * sol + dims[None, :]
        if EVEN:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < L)

    _tuned_attention_kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in _CONFIGS_16 + _CONFIGS_32
        ],
        key=["L", "D", "HAS_KEEP", "CAUSAL", "DOT_F32"],
        prune_configs_by={"early_config_prune": _prune},
    )(_attention_kernel)


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool):
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    keep_arg = q if keep is None else keep.contiguous().view(torch.uint8)  # no copy

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    if _tuning():
        kernel, fixed = _tuned_attention_kernel, {}
    else:
        wide = q.element_size() == 4
        bm, bn, w, st = (
            _INTERPRETER_CONFIG if interpreting() else (_CONFIGS_32 if wide else _CONFIGS_16)[0]
        )
        kernel = _attention_kernel
        fixed = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    with on_device(q):
        kernel[grid](
            q, k, v, out, keep_arg,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(2), out.stride(1),
            0 if keep is None else keep_arg.stride(0),
            h, n, math.log2(math.e) / math.sqrt(d),
            D=d, HAS_KEEP=keep is not None, CAUSAL=causal,
            DOT_F32=interpreting() or q.dtype == torch.float32, **fixed,
        )  # fmt: skip
    return out
