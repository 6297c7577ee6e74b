"""The ``scale`` group of bench_gpu.py: meta_step at the paper's scale, in float32 and bf16.

* The 17M GPT at 16 x 256, T = 1, 2, 4, 8: mixed (remat "auto": block on GPUs), reverse, and
  PyTorch's reverse-over-reverse (``datarater.meta.baseline``; in bf16 under autocast), each
  beside a plain training step of the same model and batch, in float32 and bf16.
* T = 2 on the 125M preset at 16 x 2048 and the 435M preset at 8 x 2048 (micro-batches of 4),
  bf16, mixed with block remat, beside a plain step; ``--dry-run``'s estimate beside the
  measured peak.
Every row carries its matmul FLOPs (counted once, as bench/meta_step_work.py counts them) and
its MFU against the card's dense bf16 peak (989 TFLOP/s on H100 and H200; float32 rows against
67 TFLOP/s, the CUDA cores').
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import datarater as dr
from datarater.meta.baseline import torch_reverse_over_reverse
from datarater.models import CausalLM, Rater, preset
from datarater.training import TrainConfig
from datarater.training import dry_run as D

GROUP = "meta_step scale"
PEAK = {torch.bfloat16: 989e12, None: 67e12}


def _work_counter():
    """bench/meta_step_work.py's dispatch mode that counts matmul FLOPs."""
    path = Path(__file__).resolve().parents[1] / "meta_step_work.py"
    spec = importlib.util.spec_from_file_location("meta_step_work", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Work


def meta_setup(device, size: str, batch: int, length: int, seed: int = 0):
    """A preset LM, the toy rater, Adam with clipping, its state, and a batch maker."""
    torch.manual_seed(seed)
    cfg = preset(size, max_seq_len=length)
    lm = CausalLM(cfg).to(device)
    rater = Rater(preset("toy", vocab_size=cfg.vocab_size, max_seq_len=length)).to(device)
    opt = dr.optim.Adam(1e-3, weight_decay=0.1, clip_norm=1.0)
    state = dr.InnerState.init(lm, opt)

    def batch_of():
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, length), device=device)}

    return lm, rater, opt, state, batch_of


def _plain(lm, ids, dtype, micro: int | None):
    """One plain training step of the model on ``ids`` (micro-batched like the meta-step)."""
    from datarater.meta.batch import SeqBatch, sequence_losses

    def run():
        lm.zero_grad(set_to_none=True)
        for part in ids.split(micro or ids.shape[0]):
            with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype is not None):
                loss = sequence_losses(lm(part), SeqBatch.from_dict({"input_ids": part}, "b"))
            loss.sum().backward()

    return run


def _flops(run, Work) -> int:
    with Work() as w:
        run()
    return w.flops


def _row(add, timed, device, name: str, run, flops: int, dtype, iters: int, **tags) -> dict:
    try:
        ms, peak = timed(run, device, iters=iters, warmup=1)
        row = dict(group=GROUP, case=name, ms=round(ms, 2), peak_mb=round(peak / 1e6, 1),
                   tflop=round(flops / 1e12, 3),
                   mfu=round(flops / (ms / 1e3) / PEAK[dtype], 3), **tags)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - report and go on
        row = dict(group=GROUP, case=name, error=f"{type(e).__name__}: {e}"[:200], **tags)
    add(row)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def _variants(lm, rater, opt, state, inner, outer, dtype, micro, remat="auto"):
    def meta(mode):
        def run():
            rater.zero_grad(set_to_none=True)
            dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode,
                         compute_dtype=dtype, micro_batch_size=micro, remat=remat)  # fmt: skip

        return run

    def baseline():
        with torch.autocast(outer["input_ids"].device.type, dtype=dtype,
                            enabled=dtype is not None):  # fmt: skip
            torch_reverse_over_reverse(rater, lm, state, inner, outer, optimizer=opt)

    return {"mixed": meta("mixed"), "reverse": meta("reverse"),
            "PyTorch reverse-over-reverse (baseline)": baseline}  # fmt: skip


def bench_small(device, add, timed, size: str, batch: int, length: int, steps: list[int]):
    Work = _work_counter()
    lm, rater, opt, state, batch_of = meta_setup(device, size, batch, length)
    outer = batch_of()
    for dtype in (None, torch.bfloat16):
        precision = "bf16" if dtype else "fp32"
        plain = _plain(lm, outer["input_ids"], dtype, None)
        tags = dict(model=size, tokens=f"{batch}x{length}", precision=precision)
        _row(add, timed, device, "plain training step", plain, _flops(plain, Work), dtype, 5,
             T=0, **tags)  # fmt: skip
        for t in steps:
            inner = [batch_of() for _ in range(t)]
            for name, run in _variants(lm, rater, opt, state, inner, outer, dtype, None).items():
                _row(add, timed, device, name, run, _flops(run, Work), dtype, 3, T=t, **tags)


def bench_large(device, add, timed, size: str, batch: int, length: int, micro: int):
    """T = 2, bf16, block remat, micro-batched: the paper's regime, and the dry run's guess."""
    Work = _work_counter()
    lm, rater, opt, state, batch_of = meta_setup(device, size, batch, length)
    inner, outer = [batch_of(), batch_of()], batch_of()
    tags = dict(model=size, tokens=f"{batch}x{length}", precision="bf16", T=2, micro=micro)
    dtype = torch.bfloat16
    plain = _plain(lm, outer["input_ids"], dtype, micro)
    _row(add, timed, device, "plain training step", plain, _flops(plain, Work), dtype, 2, **tags)
    run = _variants(lm, rater, opt, state, inner, outer, dtype, micro, "block")["mixed"]
    row = _row(add, timed, device, "mixed, block remat", run, _flops(run, Work), dtype, 2, **tags)
    cfg = TrainConfig(population=1, inner_steps=2, inner_batch=batch, outer_batch=batch,
                      micro_batch_size=micro, precision="bf16", remat="block",
                      lm={k: v for k, v in preset(size).to_dict().items()
                          if k not in ("vocab_size", "max_seq_len")},
                      rater={"d_model": 32, "n_layers": 2, "n_heads": 2})  # fmt: skip
    est = D.estimate(cfg, preset(size).vocab_size, length, device)
    measured = row.get("peak_mb")
    add(dict(group=GROUP, case="dry run's estimate", model=size, tokens=tags["tokens"],
             estimate_mb=round(est.peak_bytes / 1e6, 1), measured_mb=measured,
             ratio=round(est.peak_bytes / 1e6 / measured, 3) if measured else None))  # fmt: skip


def bench_scale(device, add, timed, smoke: bool) -> None:
    if smoke:
        bench_small(device, add, timed, "toy", 4, 32, [1, 2])
        bench_large(device, add, timed, "toy", 4, 64, 2)
        return
    bench_small(device, add, timed, "17m", 16, 256, [1, 2, 4, 8])
    bench_large(device, add, timed, "125m", 16, 2048, 4)
    bench_large(device, add, timed, "435m", 8, 2048, 4)
