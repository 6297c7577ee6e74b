"""Softmax attention that a meta-gradient can go through: flash-style in every pass.

``attention(q, k, v, keep=..., causal=..., scale=..., backend=...)`` takes ``q`` as
``[B, H, L, D]`` and ``k, v`` as ``[B, Hk, L, D]`` (``H`` a multiple of ``Hk``: grouped-query
attention), an optional ``[B, L]`` boolean ``keep`` of the keys that may be read (padding
excluded), and returns ``[B, L, H, D]`` (heads merge with a reshape). A query with no key to
read gets zeros.

It is differentiable in every mode PyTorch has: backward, ``torch.func.grad / vjp / jvp``,
forward-over-reverse (``jvp`` of ``grad``, what ``meta_step``'s mixed mode runs) and double
backward (``gradgradcheck``, what reverse mode and ``hvp="double"`` run). Only each row's
log-sum-exp is saved beside the output; every pass recomputes its tiles of scores:

* forward: online softmax over key blocks; its tangent rides along in the same pass;
* backward: from ``lse`` and ``delta = rowsum(go * o)``;
* the backward's tangent (forward-over-reverse): one more blockwise pass, never a second graph;
* the double backward: a blockwise pass of its own (:mod:`.attention_blockwise`).

Backends: ``"torch"`` (the written-out reference below: L x L scores, any dtype, the oracle),
``"blockwise"`` (:mod:`.attention_blockwise`, plain torch over tiles: the CPU default and the
fallback everywhere), ``"triton"`` (:mod:`.triton_attention`: CUDA, or the CPU under
``TRITON_INTERPRET=1``). ``backend=None`` takes Triton on CUDA where it can, else blockwise;
on CPUs the written-out formulas up to one tile (:func:`written_out_by_default`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import attention_blockwise as blockwise
from .attention_blockwise import Mask

BACKENDS = ("torch", "blockwise", "triton")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
    """Shapes, dtypes, devices and the mask: a clear error before any kernel runs."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        raise TypeError("attention takes tensors q, k, v")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            "attention takes q as [B, H, L, D] and k, v of one shape [B, Hk, L, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (n, d):
        raise ValueError(
            f"k and v must be [B, Hk, L, D] = [{b}, Hk, {n}, {d}] like q, got {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(
            f"q's {h} heads must be a multiple of k and v's {k.shape[1]} heads (grouped-query "
            "attention)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if keep is not None and (
        not isinstance(keep, Tensor)
        or keep.shape != (b, n)
        or keep.dtype != torch.bool
        or keep.device != q.device
    ):
        got = f"{keep.dtype} {tuple(keep.shape)} on {keep.device}" if isinstance(keep, Tensor) \
            else type(keep).__name__  # fmt: skip
        raise ValueError(f"keep must be a bool tensor [B, L] = [{b}, {n}] on {q.device}, got {got}")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None,
                        causal: bool = False, scale: float | None = None) -> Tensor:  # fmt: skip
    """The written-out definition, in at least float32: ``[B, L, H, D]``. Plain torch ops, so
    every derivative mode works; its L x L scores are what the other backends never store."""
    check_inputs(q, k, v, keep)
    acc = blockwise.accumulator(q.dtype)
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] if keep is None else allowed & keep[:, None, None, :]
    # a query with no key gets zeros (its scores are set to 0 first: derivatives stay finite)
    some = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~some, 0.0)
    p = torch.softmax(scores, dim=-1) * some
    return (p @ v.to(acc)).to(q.dtype).transpose(1, 2).contiguous()


def _triton() -> ModuleType:
    from . import triton_attention  # triton loads on first use only

    return triton_attention


def reason_unsupported(q: Tensor, k: Tensor | None = None) -> str | None:
    """Why the Triton kernels cannot take these inputs (None: they can)."""
    return _triton().reason_unsupported(q, q if k is None else k)


def _backend(q: Tensor, k: Tensor, backend: str | None) -> str:
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        why = reason_unsupported(q, k)
        if why is not None:
            raise ValueError(f"the triton attention backend cannot run: {why}")
    if backend is not None:
        return backend
    if q.is_cuda and reason_unsupported(q, k) is None:
        return "triton"
    return "torch" if written_out_by_default(q.shape[2], q.device) else "blockwise"


def written_out_by_default(n: int, device: torch.device) -> bool:
    """Whether ``backend=None`` runs the written-out formulas at length ``n``: on CPUs up to
    one tile of the blockwise passes, whose scores are L x L there too, and where the fewer,
    larger ops of the written-out formulas run faster (1.2x the demo's time otherwise)."""
    return device.type == "cpu" and n <= blockwise.BLOCK


def _passes(name: str) -> ModuleType:
    return _triton() if name == "triton" else blockwise


def attention(q: Tensor, k: Tensor, v: Tensor, *, keep: Tensor | None = None,
              causal: bool = False, scale: float | None = None,
              backend: str | None = None) -> Tensor:  # fmt: skip
    """Softmax attention of ``q [B, H, L, D]`` over ``k, v [B, Hk, L, D]`` into
    ``[B, L, H, D]``, scaled by ``scale`` (default ``1/sqrt(D)``); see the module."""
    check_inputs(q, k, v, keep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _backend(q, k, backend)
    if name == "torch":
        return attention_reference(q, k, v, keep, causal, scale)
    if not _needs_derivatives(q, k, v):
        return _forward_only(q, k, v, keep, causal, scale, name)
    return _Attention.apply(q, k, v, keep, causal, scale, name)[0]


def inference_attention(q: Tensor, k: Tensor, v: Tensor, *, keep: Tensor | None = None,
                        causal: bool = False, scale: float | None = None,
                        backend: str | None = None) -> Tensor:  # fmt: skip
    """:func:`attention` for callers that never differentiate it (scoring copies): no query
    of the autograd state, which torch.compile would break its graph on."""
    check_inputs(q, k, v, keep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _forward_only(q, k, v, keep, causal, scale, _backend(q, k, backend))


def _forward_only(q, k, v, keep, causal: bool, scale: float, name: str) -> Tensor:
    if name == "triton":  # one opaque operator to torch.compile
        return _inference_op(q, k, v, keep, causal, scale)
    if name == "torch":
        return attention_reference(q, k, v, keep, causal, scale)
    return blockwise.forward(q, k, v, Mask(keep, causal, scale))[0]


def _wrapped(*tensors: Tensor | None) -> bool:
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


def _needs_derivatives(*tensors: Tensor) -> bool:
    from torch.autograd.forward_ad import _current_level

    if torch.is_inference_mode_enabled():
        return False
    return (
        (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        or _current_level >= 0
        or _wrapped(*tensors)
    )


def _tangent_passes(name: str, *tensors: Tensor | None) -> ModuleType:
    """The passes a jvp runs: the named backend's, unless a transform wraps the tensors or
    autograd records the jvp (reverse over forward): then the blockwise torch ops, which every
    transform and autograd can differentiate (a kernel's tangent would carry no graph)."""
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return blockwise if recorded or _wrapped(*tensors) else _passes(name)


def _delta(o: Tensor, go: Tensor, glse: Tensor | None) -> Tensor:
    """``rowsum(go * o) - glse``, ``[B, H, L]`` in the accumulation dtype (o, go: [B, L, H, D])."""
    acc = blockwise.accumulator(o.dtype)
    delta = (go.to(acc) * o.to(acc)).sum(-1).transpose(1, 2)
    return delta if glse is None else delta - glse.to(acc)


def _zeros_if_none(x: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if x is None else x


class _Attention(torch.autograd.Function):
    """``(o, lse)``: the output ``[B, L, H, D]`` and each row's log-sum-exp ``[B, H, L]``.
    ``lse`` is an output so that the double backward can send a gradient into it. The mask
    ``keep`` travels as a saved tensor (torch.func wraps it per level like the others)."""

    @staticmethod
    def forward(q, k, v, keep, causal, scale, name):
        return _passes(name).forward(q, k, v, Mask(keep, causal, scale))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, keep, causal, scale, name = inputs
        ctx.settings = (causal, scale, name)
        ctx.save_for_backward(q, k, v, *output, keep)
        ctx.save_for_forward(q, k, v, keep)

    @staticmethod
    def backward(ctx, go, glse):
        q, k, v, o, lse, keep = ctx.saved_tensors
        go = _zeros_if_none(go, o)
        grads = _AttentionBackward.apply(q, k, v, o, lse, go, glse, keep, *ctx.settings)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v, keep = ctx.saved_tensors
        causal, scale, name = ctx.settings
        passes = _tangent_passes(name, q, k, v, tq, tk, tv)
        tq, tk, tv = (_zeros_if_none(t, x) for t, x in ((tq, q), (tk, k), (tv, v)))
        _, _, to, tlse = passes.forward(q, k, v, Mask(keep, causal, scale), tq, tk, tv)
        return to, tlse


class _AttentionBackward(torch.autograd.Function):
    """``(gq, gk, gv)`` from the saved forward and the gradients of ``o`` and ``lse``: a
    Function of its own, so that its jvp (the tangent of the backward) and its backward (the
    double backward) are written passes too."""

    @staticmethod
    def forward(q, k, v, o, lse, go, glse, keep, causal, scale, name):
        delta = _delta(o, go, glse)
        m = Mask(keep, causal, scale)
        return _passes(name).backward(q, k, v, lse, go.transpose(1, 2), delta, m)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, go, glse, keep, causal, scale, name = inputs
        ctx.settings = (causal, scale, name)
        ctx.save_for_backward(q, k, v, o, lse, go, glse, keep)
        ctx.save_for_forward(q, k, v, o, lse, go, glse, keep)

    @staticmethod
    def jvp(ctx, tq, tk, tv, to, tlse, tgo, tglse, *_):
        q, k, v, o, lse, go, glse, keep = ctx.saved_tensors
        causal, scale, name = ctx.settings
        delta = _delta(o, go, glse)
        tdelta = _delta_tangent(o, go, to, tgo, tglse, delta)
        tangents = (tq, tk, tv, tlse, tgo, tdelta)
        passes = _tangent_passes(name, q, k, v, go, *tangents)
        tgo = None if tgo is None else tgo.transpose(1, 2)
        return passes.backward_tangent(
            q, k, v, lse, go.transpose(1, 2), delta, tq, tk, tv, tlse, tgo, tdelta,
            Mask(keep, causal, scale),
        )  # fmt: skip

    @staticmethod
    def backward(ctx, uq, uk, uv):
        q, k, v, o, lse, go, glse, keep = ctx.saved_tensors
        causal, scale, _ = ctx.settings
        delta = _delta(o, go, glse)
        gq, gk, gv, ggo, g_lse, gdelta = blockwise.double_backward(
            q, k, v, lse, go.transpose(1, 2), delta, uq, uk, uv, Mask(keep, causal, scale)
        )
        # through delta = rowsum(go * o) - glse
        gdelta = gdelta.transpose(1, 2)[..., None]
        g_o = (gdelta * go.to(gdelta.dtype)).to(o.dtype)
        ggo = (ggo.transpose(1, 2) + gdelta * o.to(gdelta.dtype)).to(go.dtype)
        g_glse = None if glse is None else -gdelta[..., 0].transpose(1, 2).to(glse.dtype)
        return gq, gk, gv, g_o, g_lse.to(lse.dtype), ggo, g_glse, None, None, None, None


def _delta_tangent(o, go, to, tgo, tglse, delta: Tensor) -> Tensor:
    """The tangent of ``delta = rowsum(go * o) - glse`` (None: a zero tangent)."""
    acc = delta.dtype
    tdelta = torch.zeros_like(delta)
    if tgo is not None:
        tdelta = tdelta + (tgo.to(acc) * o.to(acc)).sum(-1).transpose(1, 2)
    if to is not None:
        tdelta = tdelta + (go.to(acc) * to.to(acc)).sum(-1).transpose(1, 2)
    if tglse is not None:
        tdelta = tdelta - tglse.to(acc)
    return tdelta


# ---------------------------------------------------------------------------------------------
# the passes called directly, for hand-written derivatives (the model's forward-over-reverse)


@dataclass
class Saved:
    """What :func:`forward_with_tangent` keeps for :func:`backward_with_tangent`."""

    q: Tensor
    k: Tensor
    v: Tensor
    tq: Tensor
    tk: Tensor
    tv: Tensor
    o: Tensor
    lse: Tensor
    to: Tensor
    tlse: Tensor
    mask: Mask
    name: str


def forward_with_tangent(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                         *, keep: Tensor | None = None, causal: bool = False,
                         scale: float | None = None, backend: str | None = None):  # fmt: skip
    """``(o, to, saved)``: the output and its tangent along ``(tq, tk, tv)``, both
    ``[B, L, H, D]``, in one pass (no autograd)."""
    check_inputs(q, k, v, keep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _backend(q, k, backend)
    if name == "torch":
        name = "blockwise"  # (the reference has no written-out passes)
    m = Mask(keep, causal, scale)
    o, lse, to, tlse = _passes(name).forward(q, k, v, m, tq, tk, tv)
    return o, to, Saved(q, k, v, tq, tk, tv, o, lse, to, tlse, m, name)


def backward_with_tangent(s: Saved, go: Tensor, tgo: Tensor):
    """``(gq, gk, gv, tgq, tgk, tgv)`` for the output gradient ``go`` and its tangent ``tgo``
    (``[B, L, H, D]``), in one backward pass that shares its tiles (no autograd)."""
    delta = _delta(s.o, go, None)
    tdelta = _delta_tangent(s.o, go, s.to, tgo, None, delta)
    return _passes(s.name).backward_tangent(
        s.q, s.k, s.v, s.lse, go.transpose(1, 2), delta, s.tq, s.tk, s.tv, s.tlse,
        tgo.transpose(1, 2), tdelta, s.mask, primal=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# inference (scoring): the Triton forward as one opaque operator to torch.compile (a traced
# call into the kernel would break the graph); its fake implementation gives the shape.


def _tuning() -> bool:
    return os.environ.get("DATARATER_ATTENTION_AUTOTUNE", "1") != "0"


@torch.library.custom_op("datarater::triton_attention", mutates_args=())
def _inference_op(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool,
                  scale: float) -> Tensor:  # fmt: skip
    return _triton().inference(q, k, v, Mask(keep, causal, scale), _tuning())


@_inference_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool, scale: float):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d)
