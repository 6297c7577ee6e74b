"""Shared helpers for the kernel tests: fresh random inputs and float64 references."""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest
import torch
from torch.func import grad, jvp

from datarater.kernels import weighted_cross_entropy_reference

IGNORE = -100
HAS_TRITON = find_spec("triton") is not None
interpreted = pytest.mark.skipif(  # without a GPU conftest.py sets the interpreter
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="with a GPU the compiled kernels are tested by the GPU cases",
)
on_gpu = pytest.mark.skipif(
    not HAS_TRITON or not torch.cuda.is_available(), reason="needs a CUDA GPU and triton"
)


def make_inputs(
    n: int,
    v: int,
    dtype=torch.float32,
    seed: int = 0,
    ignore_frac: float = 0.15,
    zero_weights: bool = True,
):
    gen = torch.Generator().manual_seed(seed * 1009 + n * 31 + v)
    z = (torch.randn(n, v, generator=gen) * 2.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    if n:
        t[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    w = torch.rand(n, generator=gen) + 0.1
    if zero_weights and n > 3:
        w[::4] = 0.0
    dz = torch.randn(n, v, generator=gen).to(dtype)
    dw = torch.randn(n, generator=gen)
    c = torch.randn(n, generator=gen)  # upstream gradient / sequence coefficients
    return z, t, w, dz, dw, c


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    if float(denom) == 0.0:
        return float(a.norm())
    return float((a - b).norm() / denom)


def reference_all(z, t, w, dz, dw, c):
    """Loss, gradients, jvp and forward-over-reverse of sum_n c_n w_n nll_n in float64."""
    z, w, dz, dw, c = (x.double() for x in (z, w, dz, dw, c))

    def loss(z_, w_):
        return weighted_cross_entropy_reference(z_, t, w_, IGNORE)

    def objective(z_, w_):
        return (c * loss(z_, w_)).sum()

    l = loss(z, w)
    gz, gw = grad(objective, argnums=(0, 1))(z, w)
    _, dl = jvp(loss, (z, w), (dz, dw))
    _, (dgz, dgw) = jvp(grad(objective, argnums=(0, 1)), (z, w), (dz, dw))
    return dict(loss=l, gz=gz, gw=gw, dl=dl, dgz=dgz, dgw=dgw)


def ours_all(fn, z, t, w, dz, dw, c):
    """The same quantities through one of our loss functions fn(z, t, w) -> per-token loss."""

    def objective(z_, w_):
        return (c.to(torch.float32 if z.dtype != torch.float64 else z.dtype) * fn(z_, t, w_)).sum()

    l = fn(z, t, w)
    gz, gw = grad(objective, argnums=(0, 1))(z, w)
    _, dl = jvp(lambda a, b: fn(a, t, b), (z, w), (dz, dw.to(w.dtype)))
    _, (dgz, dgw) = jvp(grad(objective, argnums=(0, 1)), (z, w), (dz, dw.to(w.dtype)))
    return dict(loss=l, gz=gz, gw=gw, dl=dl, dgz=dgz, dgw=dgw)


def nan_rows(v: int, dtype=torch.float32, device="cpu"):
    """Three rows: a NaN among ordinary logits (at column 3: the first a thread of a scalar
    loop sees), a vector of NaNs in a row otherwise masked with -inf (where a running max stays
    -inf), and a clean row. Torch's loss is NaN for the first two."""
    gen = torch.Generator().manual_seed(v)
    z = torch.randn(3, v, generator=gen)
    z[0, 3] = float("nan")
    z[1] = float("-inf")
    z[1, : min(v, 8)] = float("nan")
    t = torch.tensor([5 % v, 9 % v, 7 % v])
    return z.to(device=device, dtype=dtype), t.to(device), torch.rand(3, generator=gen).to(device)


def assert_nan_kept(loss, grad, clean_loss) -> None:
    """A NaN logit is never hidden: its row's loss is NaN and so is its whole gradient, as in
    torch; the clean row is untouched."""
    loss, grad = loss.detach().float().cpu(), grad.detach().float().cpu()
    if loss.dim():
        assert loss[:2].isnan().all() and torch.isfinite(loss[2])
        assert abs(loss[2].item() - clean_loss) <= 2e-2 * abs(clean_loss) + 1e-6
    else:
        assert loss.isnan()
    assert all(grad[i].isnan().all() for i in (0, 1)) and torch.isfinite(grad[2]).all()
