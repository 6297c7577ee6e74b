"""The Triton tangent kernels against float64 references, and the dispatch of tangent_ops.

Without a GPU the kernels run on the CPU under the Triton interpreter (set by conftest.py) at
small shapes; with one they are compiled and checked through the public functions, including
a whole mixed-mode meta step.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from datarater.kernels import tangent_ops as T
from datarater.kernels._ext import extension

from .conftest import gpu_meta_grads
from .kernel_cases import rel

HAS_TRITON = find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is part of the test extras")
interpreted = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="with a GPU the compiled kernels are tested by the GPU tests below",
)
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
OPS = (
    "gelu_fwd_tangent",
    "gelu_bwd_tangent",
    "softmax_fwd_tangent",
    "softmax_bwd_tangent",
    "layer_norm_fwd_tangent",
    "layer_norm_bwd_tangent",
)


def _tt():
    from datarater.kernels import triton_tangent

    return triton_tangent


def _rand(*shape, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed * 7919 + sum(shape) + len(shape))
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def _check(ours, ref, dtype):
    """Every output: the input dtype, the reference's shape, float64 agreement to TOL."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if isinstance(b, tuple):
            _check(a, b, dtype)
            continue
        assert a.dtype == dtype and a.shape == b.shape, (i, a.dtype, a.shape, b.shape)
        assert torch.isfinite(a).all(), i
        assert rel(a, b) <= TOL[dtype], (i, rel(a, b))


def _f64(*tensors):
    return tuple(t.double() for t in tensors)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail a test whose inputs the kernels silently hand to the reference."""

    def refuse(reference, *args):
        raise AssertionError(f"fell back to {reference.__name__}")

    monkeypatch.setattr(_tt(), "_fallback", refuse)


def _masked_scores(shape, seed, dtype, device, causal):
    """Scores with -inf at about a third of the positions; every row keeps its diagonal (or its
    first key when rows are not square), so that no row is fully masked."""
    s = _rand(*shape, seed=seed) * 2
    hole = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.35
    n, m = shape[-2], shape[-1]
    keep = torch.zeros(n, m, dtype=torch.bool)
    keep[torch.arange(n), torch.arange(n).clamp(max=m - 1)] = True
    s = s.masked_fill(hole & ~keep, float("-inf"))
    if causal:  # the caller may also have masked the future itself
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return s.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# the kernels, interpreted on the CPU


@interpreted
@pytest.mark.parametrize(
    "shape,dtype",
    [((1,), torch.float32), ((37, 29), torch.float32), ((3, 1029), torch.float32),
     ((5, 77), torch.bfloat16), ((5, 77), torch.float16)],
    ids=str,
)  # fmt: skip
def test_gelu_kernels(no_fallback, shape, dtype):
    TT = _tt()
    u, du, ga, dga = (_rand(*shape, seed=s, dtype=dtype) * 3 for s in range(4))
    ours = TT.gelu_fwd_tangent(u, du)
    ref = T.gelu_fwd_tangent_reference(*_f64(u, du))
    _check(ours, ref, dtype)
    g1, g2 = ours[2], ours[3]
    _check(
        TT.gelu_bwd_tangent(ga, dga, g1, g2, du),
        T.gelu_bwd_tangent_reference(*_f64(ga, dga, g1, g2, du)),
        dtype,
    )


SQUARE = [(3, 2, 1, 1), (3, 2, 7, 7), (2, 33, 33), (1, 2, 257, 257)]


@interpreted
@pytest.mark.parametrize(
    "shape,causal",
    [(s, c) for s in SQUARE for c in (True, False)] + [((4, 5, 7), False)],  # causal: square
    ids=str,
)
def test_softmax_kernels(no_fallback, shape, causal):
    TT, dtype, scale = _tt(), torch.float32, 0.37
    s, ds = _rand(*shape, seed=1) * 2, _rand(*shape, seed=2)
    ref = T.softmax_fwd_tangent_reference(*_f64(s, ds), scale, causal)
    a, da = TT.softmax_fwd_tangent(s, ds, scale, causal)
    _check((a, da), ref, dtype)
    if causal:  # the future gets exact zeros
        future = torch.ones(shape[-1], shape[-1], dtype=torch.bool).triu(1)
        assert not a.masked_select(future).any() and not da.masked_select(future).any()
    ga, dga = _rand(*shape, seed=3), _rand(*shape, seed=4)
    _check(
        TT.softmax_bwd_tangent(a, da, ga, dga, scale),
        T.softmax_bwd_tangent_reference(*_f64(a, da, ga, dga), scale),
        dtype,
    )


@interpreted
@pytest.mark.parametrize(
    "shape,dtype,causal",
    [((2, 3, 9, 9), torch.float32, True), ((2, 3, 9, 9), torch.float32, False),
     ((2, 33, 33), torch.float32, True), ((2, 33, 33), torch.float32, False),
     ((3, 6, 11), torch.float32, False),  # causal scores are square: full attention only
     ((2, 33, 33), torch.bfloat16, True), ((2, 33, 33), torch.bfloat16, False)],
    ids=str,
)  # fmt: skip
def test_softmax_with_minus_inf_scores(no_fallback, shape, dtype, causal):
    TT, scale = _tt(), 0.5
    s = _masked_scores(shape, 5, dtype, "cpu", causal)
    ds = _rand(*shape, seed=6, dtype=dtype)
    a, da = TT.softmax_fwd_tangent(s, ds, scale, causal)
    _check((a, da), T.softmax_fwd_tangent_reference(*_f64(s, ds), scale, causal), dtype)
    assert not a.masked_select(s == float("-inf")).any()


@interpreted
@pytest.mark.parametrize("programs", [512, 5], ids=["row-per-program", "rows-per-program"])
@pytest.mark.parametrize(
    "width,dtype",
    [(1, torch.float32), (5, torch.float32), (48, torch.float32), (130, torch.float32),
     (48, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_layer_norm_kernels(no_fallback, monkeypatch, width, dtype, programs):
    TT, eps = _tt(), 1e-5
    monkeypatch.setattr(TT, "_LN_BWD_PROGRAMS", programs)  # 5: 38 rows in programs of 8
    x, dx = (
        _rand(2, 19, width, seed=1, dtype=dtype) * 2 + 0.5,
        _rand(2, 19, width, seed=2, dtype=dtype),
    )
    params = tuple(_rand(width, seed=s, dtype=dtype) for s in range(3, 7))
    gy, dgy = _rand(38, width, seed=7, dtype=dtype), _rand(38, width, seed=8, dtype=dtype)
    _check_layer_norm(TT, x, dx, params, gy, dgy, eps, dtype)


@interpreted
def test_layer_norm_backward_of_rows_in_any_leading_shape(no_fallback):
    """[B, L, D] gradients as the forward saved them: one batch of rows, no fallback, and the
    parameters' gradients summed over every row as the reference sums them."""
    TT, dtype = _tt(), torch.float32
    x, dx = _rand(2, 19, 48, seed=1) * 2 + 0.5, _rand(2, 19, 48, seed=2)
    params = tuple(_rand(48, seed=s) for s in range(3, 7))
    _, _, saved = TT.layer_norm_fwd_tangent(x, dx, *params, 1e-5)
    gy, dgy = _rand(2, 19, 48, seed=7), _rand(2, 19, 48, seed=8)
    ours = TT.layer_norm_bwd_tangent(gy, dgy, saved, params[0], params[1])
    want = T.layer_norm_bwd_tangent_reference(*_f64(gy, dgy), _f64(*saved), *_f64(*params[:2]))
    assert [t.shape for t in ours] == [t.shape for t in want]
    _check(ours, want, dtype)


def _check_layer_norm(ops, x, dx, params, gy, dgy, eps: float, dtype) -> None:
    """``ops``' LayerNorm forward and backward (with tangents) against float64; the backward
    takes the forward's saved tensors as [N, D] rows."""
    y, dy, saved = ops.layer_norm_fwd_tangent(x, dx, *params, eps)
    _check((y, dy, saved), T.layer_norm_fwd_tangent_reference(*_f64(x, dx, *params), eps), dtype)
    rows = tuple(t.reshape(gy.shape[0], -1) for t in saved)
    g, dg = params[0], params[1]
    _check(
        ops.layer_norm_bwd_tangent(gy, dgy, rows, g, dg),
        T.layer_norm_bwd_tangent_reference(*_f64(gy, dgy), _f64(*rows), *_f64(g, dg)),
        dtype,
    )


@interpreted
def test_the_kernels_hand_other_cases_to_the_reference(monkeypatch):
    """float64, mixed dtypes, non-contiguous operands and rows longer than MAX_ROW take the
    reference, with its exact results."""
    TT = _tt()
    seen = []

    def spy(reference, *args):
        seen.append(reference.__name__)
        return reference(*args)

    monkeypatch.setattr(TT, "_fallback", spy)
    u, du = _rand(4, 9).double(), _rand(4, 9, seed=1).double()
    for a, b in zip(TT.gelu_fwd_tangent(u, du), T.gelu_fwd_tangent_reference(u, du), strict=True):
        assert torch.equal(a, b)
    u32 = u.float()
    for a, b in zip(TT.gelu_fwd_tangent(u32, du.bfloat16()),
                    T.gelu_fwd_tangent_reference(u32, du.bfloat16()), strict=True):  # fmt: skip
        assert torch.equal(a, b)
    ut = _rand(9, 4).t()
    for a, b in zip(TT.gelu_fwd_tangent(ut, ut), T.gelu_fwd_tangent_reference(ut, ut), strict=True):
        assert torch.equal(a, b)
    monkeypatch.setattr(TT, "MAX_ROW", 8)
    s, ds = _rand(2, 9, 9), _rand(2, 9, 9, seed=1)
    ours = TT.softmax_fwd_tangent(s, ds, 0.5, True)
    for a, b in zip(ours, T.softmax_fwd_tangent_reference(s, ds, 0.5, True), strict=True):
        assert torch.equal(a, b)
    assert seen == [
        "gelu_fwd_tangent_reference",
        "gelu_fwd_tangent_reference",
        "gelu_fwd_tangent_reference",
        "softmax_fwd_tangent_reference",
    ]


# ---------------------------------------------------------------------------------------------
# the dispatch of tangent_ops


def _fake(dtype=torch.float32):
    """Stands in for a CUDA tensor where the dispatch only reads device, dtype and layout."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, is_contiguous=lambda: True)


@needs_triton
def test_dispatch_sends_gpu_tensors_to_triton_unless_switched_off(monkeypatch):
    monkeypatch.delenv(T.TRITON_ENV, raising=False)
    assert T._route(_fake(), _fake()) == "triton"
    assert T._route(_fake(dtype=torch.bfloat16), _fake(dtype=torch.bfloat16)) == "triton"
    monkeypatch.setenv(T.TRITON_ENV, "1")
    assert T._route(_fake(dtype=torch.float16)) == "triton"
    monkeypatch.setenv(T.TRITON_ENV, "0")
    assert T._route(_fake(), _fake()) == "reference"


def test_dispatch_takes_the_reference_without_triton(monkeypatch):
    monkeypatch.delenv(T.TRITON_ENV, raising=False)
    monkeypatch.setattr(T, "_triton", lambda: None)  # triton not importable
    assert T._route(_fake()) == "reference"


def test_dispatch_on_the_cpu():
    x = torch.zeros(3, 4)
    assert T._route(x, x) == ("cpp" if extension() is not None else "reference")
    assert T._route(x.double()) == "reference"
    assert T._route(x.bfloat16()) == "reference"  # the interpreter is for tests only
    assert T._route(x, x.t()) == "reference"  # a transposed, non-contiguous operand


# ---------------------------------------------------------------------------------------------
# compiled, on a GPU


@on_gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_ops_match_float64(no_fallback, monkeypatch, dtype):
    monkeypatch.delenv(T.TRITON_ENV, raising=False)
    dev = "cuda"
    u, du, ga, dga = (_rand(300, 2048, seed=s, dtype=dtype, device=dev) * 3 for s in range(4))
    assert T._route(u, du) == "triton"
    ours = T.gelu_fwd_tangent(u, du)
    _check(ours, T.gelu_fwd_tangent_reference(*_f64(u, du)), dtype)
    args = (ga, dga, ours[2], ours[3], du)
    _check(T.gelu_bwd_tangent(*args), T.gelu_bwd_tangent_reference(*_f64(*args)), dtype)
    for shape in [(2, 8, 256, 256), (3, 1, 1), (2, 7, 7), (1, 2, 257, 257), (2, 2049, 2049)]:
        for causal in (True, False):
            s = _masked_scores(shape, 1, dtype, dev, causal)
            ds = _rand(*shape, seed=2, dtype=dtype, device=dev)
            a, da = T.softmax_fwd_tangent(s, ds, 0.125, causal)
            _check((a, da), T.softmax_fwd_tangent_reference(*_f64(s, ds), 0.125, causal), dtype)
            gs, dgs = (_rand(*shape, seed=k, dtype=dtype, device=dev) for k in (3, 4))
            _check(
                T.softmax_bwd_tangent(a, da, gs, dgs, 0.125),
                T.softmax_bwd_tangent_reference(*_f64(a, da, gs, dgs), 0.125),
                dtype,
            )
    for width in (1, 5, 130, 512, 4096):
        x, dx, gy, dgy = (_rand(1000, width, seed=s, dtype=dtype, device=dev) for s in range(4))
        params = tuple(_rand(width, seed=s, dtype=dtype, device=dev) for s in range(4, 8))
        _check_layer_norm(T, x, dx, params, gy, dgy, 1e-5, dtype)


@on_gpu
def test_gpu_switch_off_runs_the_reference(monkeypatch):
    monkeypatch.setenv(T.TRITON_ENV, "0")
    if HAS_TRITON:
        for name in OPS:
            monkeypatch.setattr(_tt(), name, None)  # calling one would raise
    s, ds = (_rand(2, 3, 33, 33, seed=k, device="cuda") for k in (0, 1))
    ours = T.softmax_fwd_tangent(s, ds, 0.3, True)
    for a, b in zip(ours, T.softmax_fwd_tangent_reference(s, ds, 0.3, True), strict=True):
        assert torch.equal(a, b)


@on_gpu
@needs_triton
def test_meta_step_on_the_gpu_mixed_equals_reverse_with_triton_tangents(monkeypatch):
    monkeypatch.delenv(T.TRITON_ENV, raising=False)
    TT = _tt()
    calls = dict.fromkeys(OPS, 0)
    fallbacks = []

    def counting(name):
        fn = getattr(TT, name)

        def counted(*args):
            calls[name] += 1
            return fn(*args)

        return counted

    for name in OPS:
        monkeypatch.setattr(TT, name, counting(name))
    monkeypatch.setattr(TT, "_fallback", lambda ref, *a: fallbacks.append(ref) or ref(*a))
    grads = gpu_meta_grads()
    assert rel(grads[0], grads[1]) < 1e-4
    assert all(calls.values()), calls  # every op went through the Triton kernels
    assert not fallbacks, fallbacks
