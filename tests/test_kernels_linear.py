"""linear_weighted_cross_entropy: chunked projection + loss, against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

from datarater.kernels import available_backends, linear_weighted_cross_entropy
from datarater.kernels import weighted_cross_entropy_reference as ref_ce
from datarater.profiling import peak_tensor_bytes

from .kernel_cases import IGNORE, rel

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


def inputs(n, d, v, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + n + d + v)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE
    sw = torch.rand(n, generator=g)
    sw[1::7] = 0.0
    tangents = [
        torch.randn(x.shape, generator=g).to(x.dtype) if x is not None else None
        for x in (h, w, b, sw)
    ]
    return h, w, b, t, sw, tangents, torch.randn(n, generator=g)


def all_quantities(fn, args, tangents, c):
    """Loss, gradients, jvp and forward-over-reverse of sum c * fn(*args) (None args skipped)."""
    keep = [i for i, a in enumerate(args) if a is not None]

    def call(*xs):
        full = list(args)
        for i, x in zip(keep, xs):
            full[i] = x
        return fn(*full)

    xs = tuple(args[i] for i in keep)
    ts = tuple(tangents[i] for i in keep)
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32

    def obj(*a):
        return (c.to(acc) * call(*a)).sum()

    argnums = tuple(range(len(xs)))
    out = {"loss": call(*xs)}
    grads = grad(obj, argnums=argnums)(*xs)
    _, out["jvp"] = jvp(call, xs, ts)
    _, hv = jvp(grad(obj, argnums=argnums), xs, ts)
    for i, (gi, hi) in enumerate(zip(grads, hv)):
        out[f"grad{i}"], out[f"fwd_rev{i}"] = gi, hi
    return out


def reference(h, w, b, t, sw):
    z = h @ w.T if b is None else h @ w.T + b
    return ref_ce(z, t, sw, IGNORE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_bytes", [700, 1 << 20])  # many chunks (N not a multiple), one
def test_linear_matches_float64(backend, bias, chunk_bytes):
    h, w, b, t, sw, tangents, c = inputs(23, 16, 301, bias=bias)

    def ours(h_, w_, b_, sw_):
        return linear_weighted_cross_entropy(
            h_, w_, t, sw_, bias=b_, ignore_index=IGNORE, backend=backend, chunk_bytes=chunk_bytes
        )

    def ref(h_, w_, b_, sw_):
        return reference(h_, w_, b_, t, sw_)

    got = all_quantities(ours, (h, w, b, sw), tangents, c)

    def d64(xs):
        return [x.double() if x is not None else None for x in xs]

    want = all_quantities(ref, d64((h, w, b, sw)), d64(tangents), c.double())
    for key in want:
        assert rel(got[key], want[key]) < 1e-5, (key, rel(got[key], want[key]))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20], ids=["vocab", "rows"])
def test_linear_gradcheck_and_gradgradcheck_float64(reduction, chunk_bytes):
    """With the defaults (eager gradients on): a second backward, as gradcheck's reentrancy
    check runs, must give the first one's values to the bit."""
    h, w, b, t, sw, *_ = inputs(5, 4, 7, dtype=torch.float64)
    args = tuple(x.detach().requires_grad_(True) for x in (h, w, b, sw.double()))

    def f(h_, w_, b_, sw_):
        return linear_weighted_cross_entropy(
            h_, w_, t, sw_, bias=b_, backend="torch", chunk_bytes=chunk_bytes, reduction=reduction
        )

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_linear_never_writes_the_n_by_v_logits():
    n, d, v = 512, 32, 4096
    h, w, _, t, sw, _, _ = inputs(n, d, v, bias=False)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def run():
        loss = linear_weighted_cross_entropy(h, w, t, sw, backend="cpu", chunk_bytes=256 << 10)
        return torch.autograd.grad(loss.sum(), (h, w))

    peak, _ = peak_tensor_bytes(run)
    logits_bytes = n * v * 4
    grads_bytes = (n * d + v * d) * 4
    assert peak < grads_bytes + 3 * (256 << 10) + v * d * 4 + 64 * n
    assert peak < logits_bytes / 2


def test_linear_bad_input():
    h, w, b, t, sw, *_ = inputs(6, 4, 9)
    f = linear_weighted_cross_entropy
    with pytest.raises(ValueError, match=r"weight must be \[V, D\] with D = 4"):
        f(h, w[:, :3], t, sw)
    with pytest.raises(ValueError, match="must match hidden"):
        f(h, w.double(), t, sw)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[9\]"):
        f(h, w, t, sw, bias=b[:4])
    with pytest.raises(ValueError, match="out of range for a vocabulary of 9"):
        f(h, w, torch.full_like(t, 9), sw)
    with pytest.raises(ValueError, match="chunk_bytes"):
        f(h, w, t, sw, chunk_bytes=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("upstream", ["sum", "mean", "per-token"])
def test_eager_gradients_equal_recomputed_ones(backend, upstream):
    h, w, b, t, sw, _, c = inputs(19, 8, 101)
    results = []
    for eager in (True, False):
        args = [x.detach().requires_grad_(True) for x in (h, w, b, sw)]
        reduction = "none" if upstream == "per-token" else upstream
        loss = linear_weighted_cross_entropy(
            args[0],
            args[1],
            t,
            args[3],
            bias=args[2],
            backend=backend,
            chunk_bytes=1000,
            reduction=reduction,
            eager_grad=eager,
        )
        (loss * c).sum().backward() if upstream == "per-token" else loss.backward()
        results.append([x.grad for x in args])
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eager", [None, True, False])
def test_eager_gradients_step_aside_under_forward_mode_ad(eager):
    """Under a dual level the gradients computed in the forward carry no tangent: a plain
    backward must recompute them, whatever ``eager_grad`` says."""
    import torch.autograd.forward_ad as fwad

    h, w, b, t, sw, tangents, _ = inputs(9, 5, 31, dtype=torch.float64)
    dh = tangents[0]

    def tangent_of_grad(create_graph: bool, eager_grad):
        with fwad.dual_level():
            x = fwad.make_dual(h.clone().requires_grad_(True) * 1.0, dh)
            loss = linear_weighted_cross_entropy(x, w, t, sw, bias=b, reduction="sum",
                                                 eager_grad=eager_grad)  # fmt: skip
            (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
            return fwad.unpack_dual(g).tangent

    want = tangent_of_grad(True, False)
    got = tangent_of_grad(False, eager)
    assert got is not None and rel(got, want) <= 1e-12


# the C++ backend takes float32 logits; the torch one covers bfloat16 here
FIRST_ORDER = [(b, d) for b in CPU_BACKENDS for d in (torch.float32, torch.bfloat16)]
FIRST_ORDER = [(b, d) for b, d in FIRST_ORDER if not (b == "cpu" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", FIRST_ORDER, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000, 6000], ids=["rows", "vocab", "vocab-b"])
def test_first_order_gradients_by_row_and_by_vocabulary_chunks(backend, dtype, chunk_bytes):
    """One chunk (gradients from the forward's logits), or many (vocabulary tiles, a fourth
    projection): both against float64, with a bias, ignored rows and zero weights."""
    h, w, b, t, sw, *_ = inputs(37, 24, 1001, dtype=dtype, seed=3)
    args = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    loss = linear_weighted_cross_entropy(
        *args[:2], t, sw, bias=args[2], backend=backend, chunk_bytes=chunk_bytes,
        ignore_index=IGNORE,
    )  # fmt: skip
    got = torch.autograd.grad(loss.sum(), args)
    ref_args = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    z = ref_args[0] @ ref_args[1].T + ref_args[2]
    ref = ref_ce(z, t, sw.double(), ignore_index=IGNORE)
    want = torch.autograd.grad(ref.sum(), ref_args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(loss, ref) <= tol
    for g, r in zip(got, want):
        assert g.dtype == dtype and rel(g, r) <= tol
    # the same through a backward that recomputes (no gradient from the forward)
    loss = linear_weighted_cross_entropy(
        *args[:2], t, sw, bias=args[2], backend=backend, chunk_bytes=chunk_bytes,
        ignore_index=IGNORE, eager_grad=False,
    )  # fmt: skip
    for g, r in zip(torch.autograd.grad(loss.sum(), args), want):
        assert rel(g, r) <= tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_order_extra_memory_stays_within_chunk_bytes(backend):
    """Beyond the gradients themselves, a forward + backward holds at most ``chunk_bytes``
    (the logits are 16 times that), and no zero buffers for the side outputs."""
    n, d, v = 512, 64, 8192
    h, w, _, t, sw, _, _ = inputs(n, d, v, bias=False)
    h.requires_grad_(True)
    w.requires_grad_(True)
    budget = 1 << 20

    def run():
        loss = linear_weighted_cross_entropy(h, w, t, sw, backend=backend, chunk_bytes=budget)
        return torch.autograd.grad(loss.sum(), (h, w))

    peak, _ = peak_tensor_bytes(run)
    grads = (n * d + v * d) * 4
    assert peak - grads <= budget, (peak - grads, budget)


def test_bfloat16_weight_gradient_is_rounded_a_bounded_number_of_times():
    """With a tiny chunk_bytes (vocabulary tiles, many row blocks by the budget alone) the
    weight gradient is still accumulated over at most 8 row blocks: its error stays close to
    that of one chunk (it was 2.3 % before the bound, against 0.27 %)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 8192, 64, 512
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / 8
    t, sw = torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g)
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, t, reduction="none") * sw.double()
    _, ref_w = torch.autograd.grad(ref.sum(), (h64, w64))
    errors = []
    for chunk_bytes in (1 << 30, 16 << 10):
        hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
        loss = linear_weighted_cross_entropy(hb, wb, t, sw, backend="torch",
                                             chunk_bytes=chunk_bytes)  # fmt: skip
        errors.append(rel(torch.autograd.grad(loss.sum(), (hb, wb))[1], ref_w))
    assert errors[1] <= 2 * errors[0] and errors[1] < 1e-2, errors


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000], ids=["rows", "vocab"])
def test_a_frozen_weight_gets_no_eager_gradient(chunk_bytes):
    """With the output projection frozen (a LoRA-style fine-tune), the forward computes the
    hidden states' gradient only: the same values, without a V x D buffer or its GEMM."""
    h, w, b, t, sw, *_ = inputs(33, 16, 2000, seed=5)

    def grad_h(eager: bool, w_trains: bool):
        hh = h.detach().requires_grad_(True)
        ww = w.detach().requires_grad_(w_trains)
        loss = linear_weighted_cross_entropy(hh, ww, t, sw, bias=b, reduction="sum",
                                             chunk_bytes=chunk_bytes, eager_grad=eager)  # fmt: skip
        return torch.autograd.grad(loss, hh)[0]

    torch.testing.assert_close(grad_h(True, False), grad_h(False, False), rtol=1e-5, atol=1e-6)
    frozen, _ = peak_tensor_bytes(lambda: grad_h(True, False))
    training, _ = peak_tensor_bytes(lambda: grad_h(True, True))
    assert frozen <= training - 0.9 * w.numel() * 4
