"""datarater's attention kernel against the written-out float64 reference in every derivative
mode (forward, backward, jvp, forward-over-reverse, double backward), on fresh random inputs
with odd lengths, grouped-query heads and padding; gradcheck and gradgradcheck; that no pass
holds an L x L tensor; its errors. Without a GPU the Triton kernels run under the interpreter
(set by conftest.py) at small shapes; with one, the compiled kernels run the GPU cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp
from torch.utils._python_dispatch import TorchDispatchMode

from datarater.kernels import attention_blockwise
from datarater.kernels.attention import attention, attention_reference

from .kernel_cases import HAS_TRITON, interpreted, on_gpu, rel

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(b, h, hk, n, d, seed, device="cpu", padded=False, empty_row=False):
    """Float64 q, k, v, their tangents, a cotangent of the output, and a mask."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    x = dict(q=randn(b, h, n, d), k=randn(b, hk, n, d), v=randn(b, hk, n, d))
    x.update(tq=randn(b, h, n, d), tk=randn(b, hk, n, d), tv=randn(b, hk, n, d))
    x["c"] = randn(b, n, h, d)
    keep = None
    if padded:
        keep = torch.rand(b, n, generator=g) > 0.3
        keep[:, 0] = True
        if empty_row:
            keep[-1] = False  # a sequence with no key at all: zeros
        keep = keep.to(device)
    return x, keep


def _all_modes(x, keep, causal, backend, dtype):
    """Output, gradients, jvp, jvp of the gradients and the double backward along the
    tangents, of sum(c * attention(q, k, v)), computed in ``dtype``."""
    cast = {k: t.to(dtype) for k, t in x.items()}
    qkv = (cast["q"], cast["k"], cast["v"])
    tangents = (cast["tq"], cast["tk"], cast["tv"])

    def att(q, k, v):
        return attention(q, k, v, keep=keep, causal=causal, backend=backend)

    def loss(q, k, v):
        return (att(q, k, v) * cast["c"]).sum()

    out = {"forward": att(*qkv), "jvp": jvp(att, qkv, tangents)[1]}
    out["grad"] = torch.cat([g.flatten() for g in grad(loss, argnums=(0, 1, 2))(*qkv)])
    fwd_rev = jvp(grad(loss, argnums=(0, 1, 2)), qkv, tangents)[1]
    out["forward-over-reverse"] = torch.cat([g.flatten() for g in fwd_rev])
    leaves = [t.detach().requires_grad_(True) for t in qkv]
    first = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    gv = sum((g * t).sum() for g, t in zip(first, tangents))
    out["double backward"] = torch.cat([g.flatten() for g in torch.autograd.grad(gv, leaves)])
    return out


def _check_all_modes(shape, causal, padded, backend, dtype, device="cpu"):
    b, h, hk, n, d = shape
    x, keep = _inputs(b, h, hk, n, d, seed=n * 7 + d, device=device, padded=padded,
                      empty_row=padded and b > 1)  # fmt: skip
    want = _all_modes(x, keep, causal, "torch", torch.float64)
    got = _all_modes(x, keep, causal, backend, dtype)
    for mode in want:
        assert got[mode].dtype == dtype, mode
        err = rel(got[mode], want[mode])
        assert err <= TOL[dtype], (mode, err)


SHAPES = [  # (B, H, Hk, L, D): odd lengths, grouped-query heads, one query, head sizes 16-128
    (2, 3, 3, 37, 16), (1, 4, 2, 37, 32), (2, 2, 1, 20, 16), (1, 2, 2, 1, 16),
    (1, 2, 1, 33, 64), (1, 1, 1, 19, 128),
]  # fmt: skip


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blockwise_matches_float64_in_every_mode(monkeypatch, shape, dtype, padded, causal):
    monkeypatch.setattr(attention_blockwise, "BLOCK", 8)  # many tiles, partial ones too
    _check_all_modes(shape, causal, padded, "blockwise", dtype)


@pytest.mark.parametrize("n", [257, 130])
def test_blockwise_at_lengths_past_its_default_block(n):
    _check_all_modes((1, 2, 1, n, 16), True, True, "blockwise", torch.float64)


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "shape,padded,dtype",
    [((2, 3, 3, 37, 16), True, torch.float32), ((1, 4, 2, 37, 32), False, torch.float32),
     ((2, 2, 1, 20, 16), True, torch.float32), ((1, 2, 2, 32, 16), False, torch.float32),
     ((1, 1, 1, 17, 64), True, torch.float32), ((2, 2, 2, 21, 16), True, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_triton_matches_float64_in_every_mode(shape, padded, dtype, causal):
    _check_all_modes(shape, causal, padded, "triton", dtype)


@on_gpu
@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 4, 2, 333, 64), torch.bfloat16), ((1, 4, 4, 256, 128), torch.bfloat16),
     ((2, 3, 3, 197, 64), torch.float32), ((1, 2, 1, 128, 128), torch.float16)],
    ids=str,
)  # fmt: skip
def test_gpu_triton_matches_float64_in_every_mode(monkeypatch, shape, dtype):
    monkeypatch.setenv("DATARATER_ATTENTION_AUTOTUNE", "0")
    for causal in (False, True):
        _check_all_modes(shape, causal, True, "triton", dtype, device="cuda")


def test_gradcheck_and_gradgradcheck(monkeypatch):
    monkeypatch.setattr(attention_blockwise, "BLOCK", 4)
    x, keep = _inputs(1, 2, 1, 9, 4, seed=5, padded=True)
    inputs = [x[k].requires_grad_(True) for k in "qkv"]
    for causal in (False, True):

        def f(q, k, v, causal=causal):
            return attention(q, k, v, keep=keep, causal=causal, backend="blockwise")

        assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, inputs)


def _reverse_over_forward(x, keep, backend: str, dtype) -> torch.Tensor:
    """d/d(q, k, v) of sum(c * jvp(attention)) by torch.func: gradients of the tangent."""
    cast = {k: t.to(dtype) for k, t in x.items()}

    def tangent_loss(q, k, v):
        def att(a, b, c):
            return attention(a, b, c, keep=keep, causal=True, backend=backend)

        tangent = jvp(att, (q, k, v), (cast["tq"], cast["tk"], cast["tv"]))[1]
        return (tangent * cast["c"]).sum()

    grads = grad(tangent_loss, argnums=(0, 1, 2))(cast["q"], cast["k"], cast["v"])
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("backend", ["blockwise", pytest.param("triton", marks=interpreted)])
def test_reverse_over_forward(monkeypatch, backend):
    """Gradients of the output's tangent: by torch.func, and through dual tensors whose primals
    require gradients (a dual level, then a backward): the jvp runs on ops autograd records."""
    from torch.autograd import forward_ad as fwad

    monkeypatch.setattr(attention_blockwise, "BLOCK", 8)
    x, keep = _inputs(1, 4, 2, 21, 16, seed=2, padded=True)
    want = _reverse_over_forward(x, keep, "torch", torch.float64)
    dtype = torch.float64 if backend == "blockwise" else torch.float32
    assert rel(_reverse_over_forward(x, keep, backend, dtype), want) <= TOL[dtype]
    leaves = [x[n].to(dtype).requires_grad_(True) for n in "qkv"]
    with fwad.dual_level():
        q, k, v = (fwad.make_dual(t, x["t" + n].to(dtype)) for t, n in zip(leaves, "qkv"))
        out = attention(q, k, v, keep=keep, causal=True, backend=backend)
        tangent = fwad.unpack_dual(out).tangent
    assert tangent.requires_grad, "the tangent lost its graph"
    got = torch.autograd.grad((tangent * x["c"].to(dtype)).sum(), leaves)
    assert rel(torch.cat([g.flatten() for g in got]), want) <= TOL[dtype]


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op makes (in-place ops make none: the Triton
    interpreter's copies of its arguments' storage back to them are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("backend", ["blockwise", pytest.param("triton", marks=interpreted)])
def test_no_pass_holds_an_l_by_l_tensor(monkeypatch, backend):
    """Every tensor any pass creates (the five modes of _all_modes) stays within a tile of
    scores or a [B, H, L, D] tensor, far from [B, H, L, L]."""
    monkeypatch.setattr(attention_blockwise, "BLOCK", 32)
    b, h, n, d = 1, 2, 160, 16
    x, keep = _inputs(b, h, h, n, d, seed=1, padded=True)
    x = {k: t.float() for k, t in x.items()}
    with _LargestTensor() as seen:
        _all_modes(x, keep, True, backend, torch.float32)
    tile = b * h * attention_blockwise.BLOCK**2 if backend == "blockwise" else 0
    assert seen.numel <= max(tile, 3 * b * h * n * d), seen.numel  # (3: the test's own cat)
    assert seen.numel < b * h * n * n
    with _LargestTensor() as seen:
        _all_modes(x, keep, True, "torch", torch.float32)
    assert seen.numel >= b * h * n * n  # (the reference writes the scores out)


def test_the_reference_is_pytorchs_attention():
    x, keep = _inputs(2, 4, 2, 9, 8, seed=0, padded=True)
    q, k, v = x["q"], x["k"], x["v"]
    for causal in (False, True):
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(9, 9, dtype=torch.bool).tril()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        got = attention_reference(q, k, v, keep, causal, scale=0.3)
        assert torch.allclose(got, want.transpose(1, 2), atol=1e-12)
        assert torch.allclose(attention(q, k, v, keep=keep, causal=causal, scale=0.3), got)
    no_key = torch.zeros(2, 9, dtype=torch.bool)
    for backend in ("torch", "blockwise"):
        zero = attention(q, k, v, keep=no_key, backend=backend)
        assert torch.equal(zero, torch.zeros_like(zero))


def test_bad_inputs_are_refused_with_the_reason():
    x, _ = _inputs(2, 2, 2, 5, 16, seed=0)
    q, k, v = (x[n].float() for n in "qkv")
    with pytest.raises(ValueError, match="one shape"):
        attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match=r"\[B, Hk, L, D\] = \[2, Hk, 5, 16\]"):
        attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="multiple of k and v's 3 heads"):
        attention(q, *(torch.randn(2, 3, 5, 16) for _ in range(2)))
    with pytest.raises(ValueError, match="share a floating dtype"):
        attention(q, k.double(), v.double())
    with pytest.raises(ValueError, match="keep must be a bool"):
        attention(q, k, v, keep=torch.ones(2, 5))
    with pytest.raises(ValueError, match="keep must be a bool"):
        attention(q, k, v, keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(TypeError, match="tensors"):
        attention(q, k, None)
    if HAS_TRITON:
        q24 = torch.randn(1, 1, 5, 24)
        with pytest.raises(ValueError, match="head size 24"):
            attention(q24, q24, q24, backend="triton")
        with pytest.raises(ValueError, match="dtype torch.float64"):
            attention(q.double(), k.double(), v.double(), backend="triton")
    # without a backend, what the kernels cannot take runs blockwise
    q24 = torch.randn(1, 1, 5, 24)
    assert torch.allclose(attention(q24, q24, q24), attention_reference(q24, q24, q24), atol=1e-6)
