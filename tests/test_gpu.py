"""GPU checks: every GPU backend against float64, and meta_step on the GPU.

Skipped on machines without CUDA; bench/gpu/check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datarater.kernels import (
    available_backends,
    linear_weighted_cross_entropy,
    weighted_cross_entropy,
)

from .conftest import gpu_meta_grads
from .kernel_cases import (
    IGNORE,
    assert_nan_kept,
    make_inputs,
    nan_rows,
    ours_all,
    reference_all,
    rel,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_the_cuda_extension_and_triton_are_there():
    assert {"cuda", "triton"} <= set(GPU_BACKENDS), GPU_BACKENDS


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(37, 50257), (129, 300), (5, 1), (1, 7), (0, 13), (300, 4096)], ids=str
)
def test_gpu_derivatives_match_float64(backend, dtype, shape):
    z, t, w, dz, dw, c = (x.cuda() for x in make_inputs(*shape, dtype=dtype))

    def fn(z_, t_, w_):
        return weighted_cross_entropy(z_, t_, w_, ignore_index=IGNORE, backend=backend)

    ref = reference_all(z, t, w, dz, dw, c)
    ours = ours_all(fn, z, t, w, dz, dw, c)
    for key, r in ref.items():
        assert rel(ours[key], r) <= TOL[dtype], (key, rel(ours[key], r))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(37, 50257), (9, 131072), (3, 200003), (129, 300), (5, 1), (0, 13)], ids=str
)
def test_gpu_fused_forward_and_gradient_match_float64(backend, dtype, shape):
    # CUDA: rows split over clusters of 1 to 8 blocks, vector and element paths, and rows too
    # long for a cluster (the two-kernel path)
    z, t, w, *_ = (x.cuda() for x in make_inputs(*shape, dtype=dtype, seed=3))
    red = "mean" if shape[0] else "sum"  # no tokens: a mean is 0 / 0
    zz = z.double().requires_grad_(True)
    ref = weighted_cross_entropy(zz, t, w.double(), ignore_index=IGNORE, reduction=red)
    (ref_grad,) = torch.autograd.grad(ref, zz)
    h = z.clone().requires_grad_(True)
    loss = weighted_cross_entropy(
        h * 1, t, w, ignore_index=IGNORE, reduction=red, backend=backend, inplace_backward=True
    )
    (grad,) = torch.autograd.grad(loss, h)
    assert rel(loss, ref) <= TOL[dtype] and rel(grad, ref_grad) <= TOL[dtype]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1 << 16], ids=["rows", "vocab-tiles"])
def test_gpu_linear_matches_float64(backend, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(301, 64, generator=g).cuda()
    wt = (torch.randn(5003, 64, generator=g) / 8).cuda()
    bias = (torch.randn(5003, generator=g) / 10).cuda()
    t = torch.randint(0, 5003, (301,), generator=g)
    t[::7] = IGNORE
    t = t.cuda()
    sw = torch.rand(301, generator=g).cuda()
    hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, wt, bias))
    loss = linear_weighted_cross_entropy(
        hh, ww, t, sw, bias=bb, backend=backend, chunk_bytes=chunk_bytes, ignore_index=IGNORE
    )
    got = torch.autograd.grad(loss.sum(), (hh, ww, bb))
    ref_in = [x.double().detach().requires_grad_(True) for x in (h, wt, bias)]
    z = ref_in[0] @ ref_in[1].T + ref_in[2]
    ref = torch.nn.functional.cross_entropy(z, t, reduction="none", ignore_index=IGNORE)
    ref = ref * sw.double()
    want = torch.autograd.grad(ref.sum(), ref_in)
    assert rel(loss, ref) < 1e-5
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


def test_meta_step_on_the_gpu_mixed_equals_reverse(monkeypatch):
    # the plain-torch tangent ops here; test_tangent_ops_triton.py runs the Triton ones
    monkeypatch.setenv("DATARATER_TANGENT_TRITON", "0")
    grads = gpu_meta_grads()
    assert rel(grads[0], grads[1]) < 1e-4


def test_meta_training_on_the_gpu_matches_the_cpu_and_resumes_across_devices(tmp_path):
    from datarater.data import ByteTokenizer, per_document
    from datarater.training import TrainConfig, Trainer

    tiny = dict(d_model=16, n_layers=1, n_heads=2)
    cfg = TrainConfig.from_dict(
        dict(steps=3, population=2, inner_steps=2, inner_batch=4, outer_batch=4, lifetime=3,
             checkpoint_every=1, lm=tiny, rater=tiny, meta_warmup=2)
    )  # fmt: skip
    docs = [f"document number {i} is about item {i * 7 % 13} " * 2 for i in range(24)]
    seqs = per_document(docs, ByteTokenizer(), 32)
    runs = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(cfg, seqs, seqs, 258, tmp_path / device, 257, device=device)
        trainer.run(progress=False)
        runs[device] = trainer
    flat = {d: torch.cat([p.detach().cpu().flatten() for p in t.rater.parameters()])
            for d, t in runs.items()}  # fmt: skip
    assert rel(flat["cuda"], flat["cpu"]) < 1e-3  # same draws, same maths, other device
    outer = {d: [r["outer_loss"] for r in t.history] for d, t in runs.items()}
    assert outer["cuda"] == pytest.approx(outer["cpu"], rel=1e-3)
    # a GPU checkpoint resumes on the CPU
    back = Trainer(cfg, seqs, seqs, 258, tmp_path / "cuda", 257, device="cpu")
    assert back.resume() and back.step == 3
    assert (
        rel(torch.cat([p.detach().flatten() for p in back.rater.parameters()]), flat["cuda"]) == 0.0
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_masked_vocabulary_stays_finite(backend, dtype):
    """Whole vectors and blocks of -inf logits (a padded vocabulary masked out)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(33, 50176, generator=g)
    z[:, :20000] = float("-inf")
    z[:, -1000:] = float("-inf")
    t = torch.randint(20000, 49176, (33,), generator=g)
    w = torch.rand(33, generator=g)
    ref_z = z.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_z, t, reduction="none") * w.double()
    (ref_g,) = torch.autograd.grad(ref.sum(), ref_z)
    zc, tc, wc = z.to(dtype).cuda(), t.cuda(), w.cuda()
    zz = zc.clone().requires_grad_(True)
    loss = weighted_cross_entropy(zz, tc, wc, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), zz)
    assert rel(loss, ref) <= TOL[dtype] and rel(grad, ref_g) <= TOL[dtype]
    h = zc.clone().requires_grad_(True)
    total = weighted_cross_entropy(
        h * 1, tc, wc, backend=backend, reduction="sum", inplace_backward=True
    )
    (fused,) = torch.autograd.grad(total, h)
    assert rel(total, ref.sum()) <= TOL[dtype] and rel(fused, ref_g) <= TOL[dtype]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [50257, 50264, 131072])
@pytest.mark.parametrize("path", ["per-token", "fused sum", "registers 16", "registers 32"])
def test_gpu_a_nan_logit_makes_its_row_nan_as_in_torch(monkeypatch, backend, dtype, v, path):
    """fmaxf passes over NaN: the CUDA reductions carry it in the sum (scalar loops at
    V = 50257, vectors otherwise, the register kernel at 16 and 32 slots)."""
    z, t, w = nan_rows(v, dtype, "cuda")
    if path.startswith("registers"):
        from datarater.kernels.native import fused_plan

        if backend != "cuda" or v % (16 // z.element_size()):
            pytest.skip("the register kernel: the CUDA backend's, for rows of whole vectors")
        monkeypatch.setenv("DATARATER_CE_FUSED_SLOTS", path.split()[1])
        assert fused_plan(z)[0] == "registers", fused_plan(z)  # the path this case is about
    clean = float(F.cross_entropy(z[2:].double(), t[2:]) * w[2])
    h = z.clone().requires_grad_(True)
    if path == "per-token":
        loss = weighted_cross_entropy(h, t, w, backend=backend)
    else:
        loss = weighted_cross_entropy(h * 1, t, w, backend=backend, reduction="sum",
                                      inplace_backward=True)  # fmt: skip
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert_nan_kept(loss, grad, clean)


def test_gpu_fused_kernel_falls_back_when_a_block_would_need_too_much_shared_memory(monkeypatch):
    """1 MiB per block is more than a block may have: the two-kernel path runs instead."""
    monkeypatch.setenv("DATARATER_CE_PART_BYTES", str(1 << 20))
    z, t, w, *_ = (x.cuda() for x in make_inputs(9, 131072, dtype=torch.bfloat16, seed=4))
    zz = z.double().requires_grad_(True)
    ref = weighted_cross_entropy(zz, t, w.double(), ignore_index=IGNORE, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, zz)
    h = z.clone().requires_grad_(True)
    loss = weighted_cross_entropy(h * 1, t, w, ignore_index=IGNORE, reduction="sum",
                                  backend="cuda", inplace_backward=True)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, h)
    assert rel(loss, ref) <= 2e-2 and rel(grad, ref_grad) <= 2e-2


@pytest.mark.parametrize("slots", ["16", "32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(129, 304), (37, 50264), (9, 131072), (5, 262144), (3, 270000), (37, 50257), (1, 8)],
    ids=str,
)
def test_gpu_fused_kernel_in_registers_matches_float64(monkeypatch, slots, dtype, shape):
    """The register-resident fused kernel (the CUDA primitive itself, in place): clusters of 1
    to 16 blocks, a masked stretch of -inf, rows whose length is not whole vectors (the
    shared-memory kernel runs) and rows too long for 16 blocks (the two-kernel path)."""
    from datarater.kernels.native import CUDA, fused_plan

    monkeypatch.setenv("DATARATER_CE_FUSED_SLOTS", slots)
    monkeypatch.delenv("DATARATER_CE_PART_BYTES", raising=False)  # the 64 KiB assumed below
    z, t, w, *_ = (x.cuda() for x in make_inputs(*shape, dtype=dtype, seed=5))
    z[0, : shape[1] // 3] = float("-inf")
    t[0], w[0] = shape[1] - 1, 1.0  # the masked row counts
    n, v = shape
    per_vec = 16 // z.element_size()
    if v % per_vec == 0 and -(-v // (int(slots) * 512)) <= 16:
        want = "registers"
    elif -(-v * z.element_size() // (64 * 1024)) <= 8:
        want = "shared memory"
    else:
        want = "two kernels"
    plan = fused_plan(z)  # checked after the numbers: a silent fallback must not pass
    zz = z.double().requires_grad_(True)
    nll_ref = F.cross_entropy(zz, t, ignore_index=IGNORE, reduction="none")
    ref = nll_ref * w.double()
    (ref_grad,) = torch.autograd.grad(ref.sum(), zz)
    loss, _, nll, grad = CUDA.forward_grad(z, t, w, IGNORE, out=z)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert grad.data_ptr() == z.data_ptr() and torch.isfinite(grad).all()
    assert rel(loss, ref) <= tol and rel(nll, nll_ref) <= tol and rel(grad, ref_grad) <= tol
    if plan[0] != want and want == "registers" and slots == "32" and -(-v // 16384) > 8:
        # a cluster's 16 blocks of 512 threads must be co-scheduled in one GPC: a card, or a
        # MIG or MPS slice, may not have room
        pytest.xfail(f"this GPU cannot co-schedule 16 one-SM blocks; ran {plan}")
    assert plan[0] == want, plan
