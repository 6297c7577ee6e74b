"""Weighted cross-entropy on the CPU: the C++ kernels against PyTorch eager.

Forward + backward of ``cross_entropy(z, y, reduction="none") * w`` at N = 4096, V = 32768,
float32, and of the fused projection + loss. Peak = live tensor bytes above the inputs
(profiler allocation events), beside the time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datarater.kernels import linear_weighted_cross_entropy, weighted_cross_entropy
from datarater.kernels.linear_cross_entropy import DEFAULT_CHUNK_BYTES
from datarater.profiling import peak_tensor_bytes

N, V = 4096, 32768
RESULTS: dict[str, dict] = {}


def _inputs(n=N, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    w = torch.rand(n, generator=g)
    return z, t, w


def _eager(z, t, w):
    return (F.cross_entropy(z, t, reduction="none") * w).sum()


CASES = {
    "torch eager": lambda z, t, w: _eager(z, t, w),
    "torch.compile": None,  # filled lazily: compiling takes a while
    "datarater cpu": lambda z, t, w: weighted_cross_entropy(z, t, w, backend="cpu").sum(),
    "datarater cpu, in-place grad": lambda z, t, w: weighted_cross_entropy(
        z, t, w, backend="cpu", inplace_backward=True
    ).sum(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_ce_forward_backward(benchmark, record, summarize, case):
    z0, t, w = _inputs()
    fn = CASES[case]
    if fn is None:
        fn = torch.compile(_eager)

    def fresh():  # logits as a fresh leaf each round (the in-place case overwrites them)
        return (z0.clone().requires_grad_(True),), {}

    def run(leaf):
        return torch.autograd.grad(fn(leaf, t, w), leaf)

    run(*fresh()[0])
    peak, _ = peak_tensor_bytes(lambda: run(*fresh()[0]))
    peak -= N * V * 4  # the fresh logits themselves are inputs, not the kernel's memory
    benchmark.pedantic(run, setup=fresh, rounds=5, warmup_rounds=1)
    row = dict(
        case=case,
        N=N,
        V=V,
        ms=1e3 * benchmark.stats.stats.median,
        peak_mib=peak / 2**20,
        grad_mib=N * V * 4 / 2**20,
    )
    RESULTS[case] = row
    record("cross_entropy", **row)
    if "torch eager" in RESULTS and "datarater cpu" in RESULTS and case == list(CASES)[-1]:
        base = RESULTS["torch eager"]["ms"]
        for name, r in RESULTS.items():
            summarize(
                "cross_entropy", f"speed-up of {name} over torch eager: {base / r['ms']:.2f}x"
            )


LN, LD, LV = 2048, 256, 32768


def _linear_inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(LN, LD, generator=g)
    wt = torch.randn(LV, LD, generator=g) / LD**0.5
    t = torch.randint(0, LV, (LN,), generator=g)
    sw = torch.rand(LN, generator=g)
    return h, wt, t, sw


@pytest.mark.parametrize(
    "case", ["torch eager", "datarater linear (default chunks)", "datarater linear (8 MiB chunks)"]
)
def test_linear_ce_forward_backward(benchmark, record, case):
    h0, w0, t, sw = _linear_inputs()
    chunk = {"datarater linear (8 MiB chunks)": 8 << 20}.get(case, DEFAULT_CHUNK_BYTES)

    def run():
        h, wt = h0.detach().requires_grad_(True), w0.detach().requires_grad_(True)
        if case == "torch eager":
            loss = _eager(h @ wt.T, t, sw)
        else:
            loss = linear_weighted_cross_entropy(h, wt, t, sw, backend="cpu", chunk_bytes=chunk)
            loss = loss.sum()
        return torch.autograd.grad(loss, (h, wt))

    run()
    peak, _ = peak_tensor_bytes(run)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    record(
        "linear_cross_entropy",
        case=case,
        N=LN,
        D=LD,
        V=LV,
        ms=1e3 * benchmark.stats.stats.median,
        peak_mib=peak / 2**20,
        logits_mib=LN * LV * 4 / 2**20,
    )
