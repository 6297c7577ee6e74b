"""Attention on the CPU: datarater's blockwise kernel against the written-out reference, and
the mixed meta-step beside a plain training step as the length grows.

* ``test_attention_pass``: forward, forward + backward, forward + jvp and forward-over-reverse
  (the jvp of the gradient: what mixed mode runs) at L = 512, 1024, 2048; time and peak
  memory of each backend, and their ratios.
* ``test_meta_step_by_length``: ``meta_step(mode="mixed")`` at T = 2 (the library's CausalLM,
  d 64, 2 layers, batch 4, Adam) for L = 128 .. 2048 beside a plain training step of the same
  model and batch, with fused and with written-out attention; peak memory, its growth per
  doubling of L and the ratio to the plain step.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

from datarater.kernels.attention import attention
from datarater.profiling import measure, meta_step_workload, peak_tensor_bytes

ATT = dict(b=2, h=4, d=64)
PASSES = ("forward", "forward + backward", "forward + jvp", "forward-over-reverse")
ROWS: dict[tuple, dict] = {}


def _pass(name: str, backend: str, n: int):
    g = torch.Generator().manual_seed(n)
    b, h, d = ATT["b"], ATT["h"], ATT["d"]
    q, k, v, tq, tk, tv = (torch.randn(b, h, n, d, generator=g) for _ in range(6))
    c = torch.randn(b, n, h, d, generator=g)

    def att(q, k, v):
        return attention(q, k, v, causal=True, backend=backend)

    def loss(q, k, v):
        return (att(q, k, v) * c).sum()

    def forward_backward():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        loss(*leaves).backward()

    runs = {
        "forward": lambda: att(q, k, v),
        "forward + backward": forward_backward,
        "forward + jvp": lambda: jvp(att, (q, k, v), (tq, tk, tv)),
        "forward-over-reverse": lambda: jvp(grad(loss, argnums=(0, 1, 2)), (q, k, v), (tq, tk, tv)),
    }
    return runs[name]


@pytest.mark.parametrize("n", [512, 1024, 2048])
@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("backend", ["blockwise", "torch"])
def test_attention_pass(benchmark, record, summarize, backend, name, n):
    run = _pass(name, backend, n)
    run()
    peak, _ = peak_tensor_bytes(run)
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    row = dict(pass_=name, backend=backend, L=n, seconds=benchmark.stats.stats.median,
               peak_mib=peak / 2**20)  # fmt: skip
    ROWS[name, backend, n] = row
    record("attention", **row)
    other = ROWS.get((name, "torch" if backend == "blockwise" else "blockwise", n))
    if other is not None:
        ours, ref = (row, other) if backend == "blockwise" else (other, row)
        summarize(
            "attention",
            f"{name} at L={n}: blockwise/written time {ours['seconds'] / ref['seconds']:.2f}, "
            f"peak {ours['peak_mib'] / ref['peak_mib']:.3f}",
        )


META = dict(batch=4, d_model=64, n_layers=2)
META_ROWS: dict[tuple, dict] = {}


def _plain_step(n: int, attention: str):
    from datarater.meta.batch import SeqBatch, sequence_losses
    from datarater.models import CausalLM, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, max_seq_len=n, d_model=META["d_model"],
                            n_layers=META["n_layers"], n_heads=2, attention=attention)  # fmt: skip
    lm = CausalLM(cfg)
    ids = torch.randint(0, 256, (META["batch"], n))
    batch = SeqBatch.from_dict({"input_ids": ids}, "batch")

    def run():
        lm.zero_grad(set_to_none=True)
        sequence_losses(lm(ids), batch).sum().backward()

    return run


@pytest.mark.parametrize("n", [128, 256, 512, 1024, 2048])
@pytest.mark.parametrize("attention", ["fused", "written"])
def test_meta_step_by_length(benchmark, record, summarize, attention, n):
    mixed = measure(meta_step_workload, "mixed", 2, seq_len=n, attention=attention, **META)
    plain = _plain_step(n, attention)
    plain()
    plain_peak, _ = peak_tensor_bytes(plain)
    benchmark.pedantic(plain, rounds=3, warmup_rounds=0)
    row = dict(attention=attention, L=n, mixed_s=mixed.seconds, mixed_mib=mixed.peak_bytes / 2**20,
               plain_s=benchmark.stats.stats.median, plain_mib=plain_peak / 2**20,
               mixed_over_plain=mixed.peak_bytes / plain_peak)  # fmt: skip
    META_ROWS[attention, n] = row
    record("meta_step_by_length", **row)
    half = META_ROWS.get((attention, n // 2))
    growth = (
        "" if half is None else f", x{row['mixed_mib'] / half['mixed_mib']:.2f} from L={n // 2}"
    )
    summarize(
        "meta_step_by_length",
        f"{attention} L={n}: mixed peak {row['mixed_mib']:.1f} MiB = "
        f"{row['mixed_over_plain']:.2f} x the plain step{growth}",
    )
