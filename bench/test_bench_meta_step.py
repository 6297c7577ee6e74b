"""meta_step: time and peak memory of mixed vs reverse mode at T = 1 and T = 8.

The configuration is one where activations dominate memory as in real training: 16 x 128
tokens through a 141k-parameter transformer, so a step's activations are ~50x the bytes of
parameters plus Adam state (the 435M anchor of design.md has a similar ~20-50x ratio).
Peak memory comes from a fresh process per configuration (datarater.profiling.measure).
"""

from __future__ import annotations

import pytest
import torch

from datarater.profiling import measure, meta_step_workload

CFG = dict(batch=16, seq_len=128, vocab=256, d_model=64, n_layers=2)
RESULTS: dict[tuple[str, int], dict] = {}


@pytest.mark.parametrize("steps", [1, 8])
@pytest.mark.parametrize("mode", ["mixed", "reverse"])
def test_meta_step(benchmark, record, summarize, mode, steps):
    mem = measure(meta_step_workload, mode, steps, threads=torch.get_num_threads(), **CFG)
    run = meta_step_workload(mode, steps, **CFG)
    benchmark.extra_info.update(mode=mode, steps=steps, peak_mib=mem.peak_bytes / 2**20)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    row = dict(
        mode=mode,
        T=steps,
        seconds=benchmark.stats.stats.median,
        peak_mib=mem.peak_bytes / 2**20,
        state_mib=mem.info["state_bytes"] / 2**20,
        params=mem.info["params"],
        tokens=mem.info["tokens"],
    )
    RESULTS[(mode, steps)] = row
    record("meta_step", **row)
    if len(RESULTS) == 4:
        m1, m8, r8 = RESULTS["mixed", 1], RESULTS["mixed", 8], RESULTS["reverse", 8]
        summarize("meta_step", f"peak mixed/reverse at T=8: {m8['peak_mib'] / r8['peak_mib']:.3f}")
        summarize(
            "meta_step",
            f"mixed growth T=1->8: {m8['peak_mib'] - m1['peak_mib']:.2f} MiB "
            f"vs 7 x state {7 * m1['state_mib']:.2f} MiB",
        )
        summarize("meta_step", f"time mixed/reverse at T=8: {m8['seconds'] / r8['seconds']:.3f}")
