"""Fused forward-over-reverse blocks (C++ on CPU float32) against their float64 references."""

from __future__ import annotations

import pytest
import torch

from datarater.kernels import tangent_ops as T
from datarater.kernels._ext import extension

from .kernel_cases import rel

pytestmark = pytest.mark.skipif(extension() is None, reason="the C++ extension is not built")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def _check(fused, reference, tol=1e-5):
    fused = fused if isinstance(fused, (tuple, list)) else (fused,)
    reference = reference if isinstance(reference, (tuple, list)) else (reference,)
    for i, (a, b) in enumerate(zip(fused, reference)):
        if isinstance(b, tuple):
            _check(a, b, tol)
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, i
        assert rel(a, b) < tol, (i, rel(a, b))


def test_gelu_blocks():
    u, du, ga, dga = (_rand(37, 29, seed=s) * 3 for s in range(4))
    _check(T.gelu_fwd_tangent(u, du), T.gelu_fwd_tangent_reference(u.double(), du.double()))
    _, _, g1, g2 = T.gelu_fwd_tangent_reference(u.double(), du.double())
    args = (ga, dga, g1.float(), g2.float(), du)
    _check(T.gelu_bwd_tangent(*args), T.gelu_bwd_tangent_reference(*(x.double() for x in args)))


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_blocks(causal):
    s, ds = _rand(3, 2, 13, 13) * 2, _rand(3, 2, 13, 13, seed=1)
    scale = 0.37
    ref = T.softmax_fwd_tangent_reference(s.double(), ds.double(), scale, causal)
    _check(T.softmax_fwd_tangent(s, ds, scale, causal), ref)
    ga, dga = _rand(3, 2, 13, 13, seed=2), _rand(3, 2, 13, 13, seed=3)
    a, da = (x.float() for x in ref)
    _check(
        T.softmax_bwd_tangent(a, da, ga, dga, scale),
        T.softmax_bwd_tangent_reference(*(x.double() for x in (a, da, ga, dga)), scale),
    )


def test_layer_norm_blocks():
    x, dx, gy, dgy = (_rand(41, 29, seed=s) for s in range(4))
    g, dg, b, db = (_rand(29, seed=s) for s in range(4, 8))
    fused = T.layer_norm_fwd_tangent(x, dx, g, dg, b, db, 1e-5)
    ref = T.layer_norm_fwd_tangent_reference(*(t.double() for t in (x, dx, g, dg, b, db)), 1e-5)
    _check(fused[:2], ref[:2])
    _check(fused[2], ref[2])
    saved32 = tuple(t.float() for t in ref[2])
    _check(
        T.layer_norm_bwd_tangent(gy, dgy, saved32, g, dg),
        T.layer_norm_bwd_tangent_reference(
            gy.double(), dgy.double(), ref[2], g.double(), dg.double()
        ),
    )


def test_layer_norm_of_rows_in_any_leading_shape():
    """[B, L, D] rows: the parameters' gradients sum over every row, as for [N, D]."""
    x, dx, gy, dgy = (_rand(3, 5, 7, seed=s) for s in range(4))
    g, dg, b, db = (_rand(7, seed=s) for s in range(4, 8))
    ref = T.layer_norm_fwd_tangent_reference(*(t.double() for t in (x, dx, g, dg, b, db)), 1e-5)
    saved32 = tuple(t.float() for t in ref[2])
    want = T.layer_norm_bwd_tangent_reference(
        gy.double(), dgy.double(), ref[2], g.double(), dg.double()
    )
    assert want[2].shape == want[3].shape == (7,)
    flat = T.layer_norm_bwd_tangent_reference(
        *(t.double().reshape(15, -1) for t in (gy, dgy)),
        tuple(t.reshape(15, -1) for t in ref[2]),
        g.double(),
        dg.double(),
    )
    for a, b_ in zip(want[2:], flat[2:]):
        torch.testing.assert_close(a, b_)
    _check(T.layer_norm_bwd_tangent(gy, dgy, saved32, g, dg), want)


def test_softmax_of_non_square_scores_without_a_causal_mask():
    s, ds = _rand(2, 3, 5) * 2, _rand(2, 3, 5, seed=1)
    ref = T.softmax_fwd_tangent_reference(s.double(), ds.double(), 0.5, False)
    _check(T.softmax_fwd_tangent(s, ds, 0.5, False), ref)


def test_fallback_is_the_reference_for_other_dtypes():
    u, du = _rand(5, 7).double(), _rand(5, 7, seed=1).double()
    for a, b in zip(T.gelu_fwd_tangent(u, du), T.gelu_fwd_tangent_reference(u, du)):
        assert torch.equal(a, b)


def test_layer_norm_backward_reference_of_one_row():
    """A single row [D]: the parameters' gradients are that row's, not summed to a scalar."""
    x, dx, gy, dgy = (_rand(7, seed=s).double() for s in range(4))
    g, dg, b, db = (_rand(7, seed=s).double() for s in range(4, 8))
    saved = T.layer_norm_fwd_tangent_reference(x, dx, g, dg, b, db, 1e-5)[2]
    one = T.layer_norm_bwd_tangent_reference(gy, dgy, saved, g, dg)
    rows = T.layer_norm_bwd_tangent_reference(
        gy[None], dgy[None], tuple(t[None] for t in saved), g, dg
    )
    assert one[2].shape == one[3].shape == (7,)
    for a, b_ in zip(one, rows):
        torch.testing.assert_close(a, b_.reshape(a.shape))
