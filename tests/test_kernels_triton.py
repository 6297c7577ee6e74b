"""The Triton backend, run by the Triton interpreter on the CPU at small shapes."""

from __future__ import annotations

import os

import pytest
import torch

from datarater.kernels import linear_weighted_cross_entropy, weighted_cross_entropy

from .kernel_cases import IGNORE, make_inputs, ours_all, reference_all, rel

triton = pytest.importorskip("triton", reason="triton is part of the test extras")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="with a GPU the compiled kernels are tested in test_gpu.py",
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def wce(z, t, w):
    return weighted_cross_entropy(z, t, w, ignore_index=IGNORE, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(19, 3001), (6, 1), (3, 64), (0, 9)], ids=str)
def test_triton_derivatives_match_float64(dtype, shape):
    z, t, w, dz, dw, c = make_inputs(*shape, dtype=dtype, seed=2)
    ref = reference_all(z, t, w, dz, dw, c)
    ours = ours_all(wce, z, t, w, dz, dw, c)
    for key, r in ref.items():
        assert rel(ours[key], r) <= TOL[dtype], (key, rel(ours[key], r))


def test_triton_matches_the_cpu_kernel_and_writes_in_place():
    from datarater.kernels.triton_ce import TRITON

    z, t, w, *_ = make_inputs(11, 700, seed=5)
    loss, lse, nll = TRITON.forward(z, t, w, IGNORE)
    buf = z.clone()
    _, g = TRITON.directional(buf, t, lse, None, None, w, IGNORE, True, out=buf)
    assert g is buf
    zz = z.double().requires_grad_(True)
    ref = torch.autograd.grad(
        torch.nn.functional.cross_entropy(zz, t, reduction="none").mul(w.double()).sum(), zz
    )[0]
    assert rel(g, ref) < 1e-5


def test_triton_linear_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=gen)
    wt = torch.randn(50, 8, generator=gen)
    t = torch.randint(0, 50, (13,), generator=gen)
    w = torch.rand(13, generator=gen)
    ours = linear_weighted_cross_entropy(h, wt, t, w, backend="triton", chunk_bytes=600)
    ref = weighted_cross_entropy((h @ wt.T).double(), t, w.double(), backend="torch")
    assert rel(ours, ref) < 1e-5


def test_triton_rows_whose_first_blocks_are_masked(monkeypatch):
    """A block of -inf logits (a masked vocabulary) before any finite one: no inf - inf."""
    from datarater.kernels import triton_ce

    monkeypatch.setattr(triton_ce, "_block", lambda v: 16)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 100, generator=g)
    z[:, :40] = float("-inf")
    t = torch.randint(40, 100, (5,), generator=g)
    w = torch.rand(5, generator=g)
    ref_z = z.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_z, t, reduction="none") * w.double()
    (ref_g,) = torch.autograd.grad(ref.sum(), ref_z)
    zz = z.clone().requires_grad_(True)
    loss = wce(zz, t, w)
    (grad,) = torch.autograd.grad(loss.sum(), zz)
    assert rel(loss, ref) < 1e-5 and rel(grad, ref_g) < 1e-5
    h = z.clone().requires_grad_(True)
    total = weighted_cross_entropy(
        h * 1, t, w, backend="triton", reduction="sum", inplace_backward=True
    )
    (fused,) = torch.autograd.grad(total, h)
    assert rel(total, ref.sum()) < 1e-5 and rel(fused, ref_g) < 1e-5
