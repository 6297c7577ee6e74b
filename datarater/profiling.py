"""Peak-memory and time measurement that works on the CPU as well as on a GPU.

PyTorch keeps no peak-memory statistics for host memory, so on the CPU a workload runs in a
fresh process whose allocator returns freed blocks to the system at once; the peak resident
set size (reset just before the timed call) minus the resident size at that moment is the
workload's peak. On a GPU, torch.cuda's own peak statistics are used in the same process.
Figures are meant to be compared as ratios between runs of one session, never as absolutes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    seconds: float
    info: dict


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak host memory needs Linux")
    return int(m.group(1)) * 1024


def _child(queue, builder, args, kwargs) -> None:
    try:
        run = builder(*args, **kwargs)
        info = run() or {}  # warm-up: thread pools and lazy allocations are not the workload's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
        base = _status("VmRSS")
        t0 = time.perf_counter()
        info = run() or info
        seconds = time.perf_counter() - t0
        queue.put(("ok", Measurement(_status("VmHWM") - base, seconds, dict(info))))
    except BaseException as e:  # report to the parent rather than hang it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure(builder: Callable[..., Callable[[], Any]], *args, **kwargs) -> Measurement:
    """Run ``builder(*args, **kwargs)()`` twice and measure the second call.

    ``builder`` sets a workload up and returns a zero-argument callable; it must be importable
    from a module (it runs in a spawned process on the CPU). On CUDA tensors, use
    :func:`measure_cuda` instead.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    # A fixed mmap threshold sends every block >= 64 KiB to mmap, so a free gives it back.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"
    try:
        proc = ctx.Process(target=_child, args=(queue, builder, args, kwargs))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"measured workload failed: {payload}")
    return payload


def measure_cuda(run: Callable[[], Any]) -> Measurement:
    """Peak CUDA memory above the current allocation, and time, of one call after a warm-up."""
    info = run() or {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    info = run() or info
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return Measurement(torch.cuda.max_memory_allocated() - base, seconds, dict(info))


def meta_step_workload(
    mode: str,
    steps: int,
    *,
    batch: int = 16,
    seq_len: int = 128,
    vocab: int = 256,
    d_model: int = 64,
    n_layers: int = 2,
    micro_batch_size: int | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    seed: int = 0,
) -> Callable[[], dict]:
    """A meta-step on the library's transformer where activations dominate memory.

    Returns a callable that runs one ``meta_step`` and reports what it keeps per inner step.
    """
    from . import InnerState, meta_step
    from .models import CausalLM, Rater, TransformerConfig
    from .optim import Adam

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    cfg = TransformerConfig(
        vocab_size=vocab,
        max_seq_len=seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=max(1, d_model // 32),
    )
    lm = CausalLM(cfg).to(dt)
    rater = Rater(
        TransformerConfig(vocab_size=vocab, max_seq_len=seq_len, d_model=32, n_layers=1, n_heads=1)
    ).to(dt)
    opt = Adam(1e-3, weight_decay=0.1, clip_norm=1.0)
    state = InnerState.init(lm, opt)
    gen = torch.Generator().manual_seed(seed)
    inner = [
        {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)}
        for _ in range(steps)
    ]
    outer = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)}

    def run() -> dict:
        rater.zero_grad(set_to_none=True)
        res = meta_step(
            rater,
            lm,
            state,
            inner,
            outer,
            optimizer=opt,
            mode=mode,
            micro_batch_size=micro_batch_size,
        )
        return {
            "state_bytes": state.num_bytes(),
            "params": sum(p.numel() for p in state.params.values()),
            "tokens": batch * seq_len,
            "outer_loss": res.outer_loss,
        }

    return run
