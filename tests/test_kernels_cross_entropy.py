"""weighted_cross_entropy: every backend here against float64 references, in every AD mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import vjp

from datarater.kernels import available_backends, weighted_cross_entropy
from datarater.profiling import peak_tensor_bytes

from .kernel_cases import (
    IGNORE,
    assert_nan_kept,
    make_inputs,
    nan_rows,
    ours_all,
    reference_all,
    rel,
)

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
SHAPES = [(37, 50257), (129, 300), (5, 1), (1, 7), (0, 13)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def wce(backend):
    def fn(z, t, w):
        return weighted_cross_entropy(z, t, w, ignore_index=IGNORE, backend=backend)

    return fn


def test_the_cpu_backend_is_built():
    assert "cpu" in CPU_BACKENDS, "the C++ extension should build wherever a compiler exists"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_all_derivatives_match_float64(backend, dtype, shape):
    z, t, w, dz, dw, c = make_inputs(*shape, dtype=dtype)
    ref = reference_all(z, t, w, dz, dw, c)
    ours = ours_all(wce(backend), z, t, w, dz, dw, c)
    assert ours["loss"].dtype == torch.float32 and ours["gz"].dtype == dtype
    for key, r in ref.items():
        assert torch.isfinite(ours[key].double()).all(), key
        assert rel(ours[key], r) <= TOL[dtype], (key, rel(ours[key], r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_and_zero_weight_rows_get_exact_zeros(backend):
    z, t, w, *_ = make_inputs(40, 33)
    z.requires_grad_(True)
    loss = weighted_cross_entropy(z, t, w, backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), z)
    dead = (t == IGNORE) | (w == 0)
    assert dead.any() and (loss[dead] == 0).all() and (g[dead] == 0).all()
    assert (loss[~dead] > 0).all()


def test_gradcheck_and_gradgradcheck_in_float64():
    z, t, w, *_ = make_inputs(6, 9, dtype=torch.float64)
    z.requires_grad_(True)
    w = w.double().requires_grad_(True)

    def f(z_, w_):
        return weighted_cross_entropy(z_, t, w_, backend="torch")

    assert torch.autograd.gradcheck(f, (z, w))
    assert torch.autograd.gradgradcheck(f, (z, w))
    assert torch.autograd.gradcheck(
        f,
        (z, w),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_in_float32_against_finite_differences(backend):
    z, t, w, *_ = make_inputs(4, 6, dtype=torch.float32)
    z.requires_grad_(True)
    w.requires_grad_(True)

    def f(z_, w_):
        return weighted_cross_entropy(z_, t, w_, backend=backend)

    assert torch.autograd.gradcheck(
        f, (z, w), eps=1e-2, atol=1e-2, rtol=1e-2, nondet_tol=1e-6, fast_mode=True
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vjp_and_reductions(backend):
    z, t, w, _, _, c = make_inputs(50, 21)
    out, pull = vjp(lambda a: weighted_cross_entropy(a, t, w, backend=backend), z)
    (gz,) = pull(c)
    ref = reference_all(z, t, w, z, c, c)
    assert rel(gz, ref["gz"]) < 1e-5
    total = weighted_cross_entropy(z, t, w, reduction="sum", backend=backend)
    mean = weighted_cross_entropy(z, t, w, reduction="mean", backend=backend)
    valid = (t != IGNORE).double()
    assert float(total) == pytest.approx(float(ref["loss"].sum()), rel=1e-5)
    assert float(mean) == pytest.approx(
        float(ref["loss"].sum() / (w.double() * valid).sum()), rel=1e-5
    )
    unweighted = weighted_cross_entropy(z, t, backend=backend)
    expected = torch.nn.functional.cross_entropy(z.double(), t, reduction="none")
    assert rel(unweighted, expected) < 1e-6


def test_the_cpu_kernel_writes_no_n_by_v_temporary():
    n, v = 256, 4096
    z, t, w, *_ = make_inputs(n, v)
    z.requires_grad_(True)
    grad_bytes = n * v * 4

    def step(backend):
        def run():
            loss = weighted_cross_entropy(z, t, w, backend=backend)
            return torch.autograd.grad(loss.sum(), z)

        return run

    ours, _ = peak_tensor_bytes(step("cpu"))
    plain, _ = peak_tensor_bytes(step("torch"))
    assert ours <= grad_bytes + 64 * n  # the gradient itself and O(N) vectors
    assert plain >= 2 * grad_bytes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input_is_named(backend):
    z, t, w, *_ = make_inputs(8, 5)
    f = weighted_cross_entropy
    with pytest.raises(ValueError, match=r"logits must be a tensor \[N, V\]"):
        f(z[None], t, w, backend=backend)
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[8\]"):
        f(z, t[:-1], w, backend=backend)
    with pytest.raises(TypeError, match="targets must be int64"):
        f(z, t.int(), w, backend=backend)
    with pytest.raises(ValueError, match="out of range for a vocabulary of 5"):
        f(z, torch.full_like(t, 5), w, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        f(z, torch.full_like(t, -3), w, backend=backend)
    with pytest.raises(ValueError, match="NaN or inf"):
        f(z, t, torch.full_like(w, float("nan")), backend=backend)
    with pytest.raises(ValueError, match=r"weights must be \[N\]"):
        f(z, t, w[:3], backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        f(z.long(), t, w, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        f(z, t, w, reduction="avg", backend=backend)


def test_unknown_or_unusable_backends_are_refused():
    z, t, w, *_ = make_inputs(8, 5)
    with pytest.raises(ValueError, match="unknown backend"):
        weighted_cross_entropy(z, t, w, backend="metal")
    with pytest.raises(ValueError, match="contiguous"):
        weighted_cross_entropy(z.T.contiguous().T, t, w, backend="cpu")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        weighted_cross_entropy(z.double(), t, w, backend="cpu")
    with pytest.raises(ValueError, match="CUDA|cuda"):
        weighted_cross_entropy(z, t, w, backend="cuda")
    assert torch.isfinite(weighted_cross_entropy(z.double(), t, w)).all()  # falls back to torch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend):
    n, d, v = 64, 8, 300
    g = torch.Generator().manual_seed(4)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    wt = torch.randn(v, d, generator=g)
    t, w = torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g)

    def grads(inplace):
        loss = weighted_cross_entropy(h @ wt.T, t, w, backend=backend, inplace_backward=inplace)
        return torch.autograd.grad(loss.sum(), h)

    torch.testing.assert_close(grads(True)[0], grads(False)[0], rtol=1e-5, atol=1e-6)
    ours, _ = peak_tensor_bytes(lambda: grads(True))
    regular, _ = peak_tensor_bytes(lambda: grads(False))
    if backend != "torch":  # the reference materialises its temporaries anyway
        assert ours <= regular - 0.9 * n * v * 4  # one N x V buffer fewer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_never_hands_a_stale_logit_to_another_reader(backend):
    """The per-token in-place backward overwrites the logits; a second backward through the
    same graph, or another term that saved them, must fail rather than read the gradient."""
    z, t, w, *_ = make_inputs(6, 11, seed=12)
    x = z.clone().requires_grad_(True)
    logits = x * 1.0
    loss = weighted_cross_entropy(logits, t, w, ignore_index=IGNORE, backend=backend,
                                  inplace_backward=True).sum()  # fmt: skip
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    logits = x * 1.0
    square = (logits * logits).sum()  # saves the logits before the loss is taken
    loss = weighted_cross_entropy(logits, t, w, ignore_index=IGNORE, backend=backend,
                                  inplace_backward=True).sum()  # fmt: skip
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + square).backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_inplace_backward_keeps_forward_mode_tangents(backend, reduction):
    """Forward-over-reverse with forward-mode AD (a dual level around a plain backward): the
    in-place option must step aside, and leave the caller's tangent alone."""
    import torch.autograd.forward_ad as fwad

    z, t, w, *_ = make_inputs(7, 13, seed=13)
    dz = torch.randn_like(z)
    p, d = z.double().softmax(-1), dz.double()
    valid = (t != IGNORE).double()[:, None]
    want = valid * w.double()[:, None] * (p * d - p * (p * d).sum(-1, keepdim=True))
    for inplace in (False, True):
        tangent = dz.clone()
        with fwad.dual_level():
            x = fwad.make_dual(z.clone().requires_grad_(True) * 1.0, tangent)
            opts = dict(reduction=reduction, backend=backend, inplace_backward=inplace)
            loss = weighted_cross_entropy(x, t, w, ignore_index=IGNORE, **opts).sum()
            (g,) = torch.autograd.grad(loss, x)
            got = fwad.unpack_dual(g).tangent
        assert rel(got, want) <= 1e-5, inplace
        assert torch.equal(tangent, dz)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("v", [50257, 64])
@pytest.mark.parametrize("fused", [False, True], ids=["per-token", "fused sum"])
def test_a_nan_logit_makes_its_row_nan_as_in_torch(backend, v, fused):
    z, t, w = nan_rows(v)
    clean = float(torch.nn.functional.cross_entropy(z[2:].double(), t[2:]) * w[2])
    h = z.clone().requires_grad_(True)
    if fused:
        loss = weighted_cross_entropy(h * 1, t, w, backend=backend, reduction="sum",
                                      inplace_backward=True)  # fmt: skip
    else:
        loss = weighted_cross_entropy(h, t, w, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert_nan_kept(loss, grad, clean)


FUSED_CASES = [  # every backend here, triton too (interpreter); the C++ one takes float32
    (b, d)
    for b in available_backends("cpu")
    for d in (torch.float32, torch.bfloat16)
    if not (b == "cpu" and d == torch.bfloat16)
]


@pytest.mark.parametrize("backend,dtype", FUSED_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_inplace_loss_computes_its_gradient_in_the_forward(backend, reduction, dtype):
    z, t, w, *_ = make_inputs(23, 1031, dtype=dtype, seed=8)
    ref_z = z.double().requires_grad_(True)
    ref = weighted_cross_entropy(ref_z, t, w.double(), ignore_index=IGNORE, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(3.0 * ref, ref_z)
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    h = z.clone().requires_grad_(True)
    logits = h * 1.0  # a non-leaf, like a projection's output
    loss = weighted_cross_entropy(
        logits, t, w, ignore_index=IGNORE, reduction=reduction, backend=backend,
        inplace_backward=True,
    )  # fmt: skip
    assert rel(loss, ref) <= tol
    assert rel(logits.detach(), ref_grad / 3.0) <= tol  # the forward wrote the gradient
    (3.0 * loss).backward()  # a scaled loss: the handed-back buffer is rescaled
    assert rel(h.grad, ref_grad) <= tol
    with pytest.raises(RuntimeError, match="once"):  # first order only
        logits2 = z.clone().requires_grad_(True) * 1.0
        out = weighted_cross_entropy(
            logits2, t, w, ignore_index=IGNORE, reduction=reduction, backend=backend,
            inplace_backward=True,
        )  # fmt: skip
        (g,) = torch.autograd.grad(out, logits2, create_graph=True)
        g.sum().backward()


def test_reduced_inplace_loss_takes_the_regular_path_when_more_is_asked():
    z, t, w, *_ = make_inputs(9, 70, seed=9)
    zz = z.double().requires_grad_(True)
    ww = w.double().requires_grad_(True)
    ref_gz, ref_gw = torch.autograd.grad(
        weighted_cross_entropy(zz, t, ww, reduction="mean"), (zz, ww)
    )
    # under torch.func nothing is overwritten and the gradient is the regular one
    before = z.clone()
    g = torch.func.grad(
        lambda x: weighted_cross_entropy(x, t, w, reduction="mean", inplace_backward=True)
    )(z)
    assert torch.equal(z, before)
    assert rel(g, ref_gz) <= 1e-5
    # weights that need gradients get them
    h, wg = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = weighted_cross_entropy(h * 1.0, t, wg, reduction="mean", inplace_backward=True)
    gz, gw = torch.autograd.grad(loss, (h, wg))
    assert rel(gz, ref_gz) <= 1e-5 and rel(gw, ref_gw) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unweighted_loss_is_differentiable(backend):
    """Without weights the loss is a tensor of its own, never the (non-differentiable) nll."""
    z, t, *_ = make_inputs(7, 31, seed=12)
    zz = z.clone().requires_grad_(True)
    loss = weighted_cross_entropy(zz, t, ignore_index=IGNORE, backend=backend)
    assert loss.grad_fn is not None
    (g,) = torch.autograd.grad(loss.sum(), zz)
    ref_z = z.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_z, t, ignore_index=IGNORE, reduction="sum")
    assert rel(g, torch.autograd.grad(ref, ref_z)[0]) <= 1e-5


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_reduced_inplace_loss_agrees_with_the_regular_path_on_edge_cases(backend):
    """A mean over no token is nan on both paths; a loss scaled by 1/3 in bfloat16 gets its
    gradient rescaled without rounding the factor; float16 takes the regular path."""
    z, t, w, *_ = make_inputs(6, 40, seed=13)
    t_none = torch.full_like(t, IGNORE)
    for targets, n in ((t_none, 6), (t[:0], 0)):
        zz = z[:n].clone().requires_grad_(True)
        fused = weighted_cross_entropy(
            zz * 1, targets, w[:n], ignore_index=IGNORE, reduction="mean", backend=backend,
            inplace_backward=True,
        )  # fmt: skip
        regular = weighted_cross_entropy(
            z[:n], targets, w[:n], ignore_index=IGNORE, reduction="mean", backend=backend
        )
        assert torch.isnan(fused) and torch.isnan(regular)
    if backend != "torch":
        # bfloat16 below: the C++ backend takes float32 only, and Triton's interpreter
        # truncates float32 -> bfloat16 (GPUs round to nearest), a bias of its own
        return
    z, t, w, *_ = make_inputs(256, 512, seed=13)  # enough values for a bias to show
    zb = z.to(torch.bfloat16)
    h = zb.clone().requires_grad_(True)
    loss = weighted_cross_entropy(h * 1, t, w, ignore_index=IGNORE, reduction="sum",
                                  backend=backend, inplace_backward=True)  # fmt: skip
    (g,) = torch.autograd.grad(loss / 3, h)
    ref_z = zb.double().requires_grad_(True)
    ref = weighted_cross_entropy(ref_z, t, w.double(), ignore_index=IGNORE, reduction="sum")
    (ref_g,) = torch.autograd.grad(ref / 3, ref_z)
    bias = float(((g.double() - ref_g) * ref_g.sign()).sum() / ref_g.abs().sum())
    assert abs(bias) < 1e-3, bias  # the factor itself was not rounded to bfloat16
    zh = z.to(torch.float16).requires_grad_(True)
    out = weighted_cross_entropy(zh * 1, t, w, ignore_index=IGNORE, reduction="mean",
                                 backend=backend, inplace_backward=True)  # fmt: skip
    assert "Fused" not in type(out.grad_fn).__name__


def test_a_refused_create_graph_backward_leaves_the_gradient_for_a_plain_one():
    z, t, w, *_ = make_inputs(5, 33, seed=14)
    h = z.clone().requires_grad_(True)
    logits = h * 1
    loss = weighted_cross_entropy(logits, t, w, ignore_index=IGNORE, reduction="sum",
                                  inplace_backward=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="first order"):
        torch.autograd.grad(loss, logits, create_graph=True, retain_graph=True)
    (g,) = torch.autograd.grad(loss, logits)
    ref_z = z.double().requires_grad_(True)
    ref = weighted_cross_entropy(ref_z, t, w.double(), ignore_index=IGNORE, reduction="sum")
    assert rel(g, torch.autograd.grad(ref, ref_z)[0]) <= 1e-5


def test_the_fused_cuda_kernel_settings_are_checked(monkeypatch):
    from datarater.kernels import native

    monkeypatch.setenv("DATARATER_CE_PART_BYTES", "512")
    with pytest.raises(ValueError, match="DATARATER_CE_PART_BYTES must be"):
        native._part_bytes()
    monkeypatch.setenv("DATARATER_CE_PART_BYTES", "98304")
    assert native._part_bytes() == 98304
    monkeypatch.setenv("DATARATER_CE_FUSED_SLOTS", "64")
    with pytest.raises(ValueError, match="DATARATER_CE_FUSED_SLOTS must be"):
        native._slots()
    monkeypatch.setenv("DATARATER_CE_FUSED_SLOTS", "16")
    assert native._slots() == 16
    assert native.fused_plan(torch.zeros(2, 8)) is None  # no CUDA extension or tensor here
