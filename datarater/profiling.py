"""Peak memory and time of a workload, on the CPU as on a GPU.

PyTorch keeps no peak-memory statistics for host memory, so on the CPU the profiler's
allocation events (every tensor allocation and free, with its size) are replayed to find the
peak of live tensor bytes above what was allocated when the workload started: the host
counterpart of ``torch.cuda.max_memory_allocated``. On a GPU, torch.cuda's own statistics are
used. Figures are meant to be compared as ratios within one run, never as absolutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    seconds: float
    info: dict


def peak_tensor_bytes(run: Callable[[], Any]) -> tuple[int, Any]:
    """Peak of live tensor bytes allocated by ``run()`` above those live before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out


def measure(builder: Callable[..., Callable[[], Any]], *args, **kwargs) -> Measurement:
    """Build a workload with ``builder(*args, **kwargs)``, warm it up, then time one call and
    take the peak memory of another."""
    run = builder(*args, **kwargs)
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak, info = peak_tensor_bytes(run)
    return Measurement(peak, seconds, dict(info or {}))


def meta_step_workload(
    mode: str,
    steps: int,
    *,
    batch: int = 16,
    seq_len: int = 128,
    vocab: int = 256,
    d_model: int = 64,
    n_layers: int = 2,
    dtype: str = "float32",
    threads: int | None = None,
    seed: int = 0,
    attention: str = "fused",
    **options,
) -> Callable[[], dict]:
    """A meta-step on the library's transformer where activations dominate memory.

    Returns a callable that runs one ``meta_step`` and reports what it keeps per inner step.
    ``attention`` is the models' (``"fused"`` or ``"written"``, see TransformerConfig);
    ``options`` go to ``meta_step`` (``micro_batch_size``, ``hvp``, ``loss_backend``,
    ``remat``, ``compute_dtype``). ``mode="pytorch"`` runs the baseline instead: PyTorch's own
    reverse-over-reverse (:mod:`datarater.meta.baseline`), on the same model, batches and
    optimizer.
    """
    from . import InnerState, meta_step
    from .meta.baseline import torch_reverse_over_reverse
    from .optim import Adam

    if mode == "pytorch" and any(v is not None and v != "auto" for v in options.values()):
        raise ValueError(f"the PyTorch baseline takes none of meta_step's options {options}")
    if threads:
        torch.set_num_threads(threads)
    lm, rater = _workload_models(vocab, seq_len, d_model, n_layers, attention, seed)
    lm, rater = lm.to(getattr(torch, dtype)), rater.to(getattr(torch, dtype))
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
        if mode == "pytorch":
            _, outer_loss = torch_reverse_over_reverse(
                rater, lm, state, inner, outer, optimizer=opt
            )
        else:
            res = meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode, **options)
            outer_loss = res.outer_loss
        return {
            "state_bytes": state.num_bytes(),
            "params": sum(p.numel() for p in state.params.values()),
            "tokens": batch * seq_len,
            "outer_loss": outer_loss,
        }

    return run


def _workload_models(vocab, seq_len, d_model, n_layers, attention, seed):
    """The workload's inner LM (heads of 32) and a one-layer rater of width 32."""
    from .models import CausalLM, Rater, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=vocab,
        max_seq_len=seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=max(1, d_model // 32),
        attention=attention,
    )
    rater_cfg = TransformerConfig(vocab_size=vocab, max_seq_len=seq_len, d_model=32,
                                  n_layers=1, n_heads=1, attention=attention)  # fmt: skip
    return CausalLM(cfg), Rater(rater_cfg)
