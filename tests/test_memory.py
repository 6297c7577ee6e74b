"""Peak memory, measured in a fresh process (ratios within one run, never absolutes)."""

from __future__ import annotations

import pytest

from datarater.profiling import measure, meta_step_workload


@pytest.mark.slow
def test_peak_memory_falls_with_the_micro_batch_size():
    kw = dict(batch=16, seq_len=128, d_model=64, threads=1)
    whole = measure(meta_step_workload, "mixed", 2, **kw)
    half = measure(meta_step_workload, "mixed", 2, micro_batch_size=8, **kw)
    quarter = measure(meta_step_workload, "mixed", 2, micro_batch_size=4, **kw)
    assert whole.info["outer_loss"] == pytest.approx(quarter.info["outer_loss"], rel=1e-5)
    assert quarter.peak_bytes < 0.75 * half.peak_bytes < 0.75**2 * whole.peak_bytes


@pytest.mark.slow
def test_mixed_mode_memory_is_flat_in_the_number_of_steps():
    kw = dict(batch=16, seq_len=128, d_model=64, threads=1)
    m1 = measure(meta_step_workload, "mixed", 1, **kw)
    m4 = measure(meta_step_workload, "mixed", 4, **kw)
    r4 = measure(meta_step_workload, "reverse", 4, **kw)
    kept = m1.info["state_bytes"]  # theta_t and s_t: what mixed mode keeps per extra step
    assert m4.peak_bytes - m1.peak_bytes <= 3 * kept + 0.05 * m1.peak_bytes
    assert m4.peak_bytes < 0.5 * r4.peak_bytes
