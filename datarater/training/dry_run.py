"""``datarater train --dry-run``: will a training configuration fit this device, and how long
will a meta-step take, before anything long runs.

The estimate has two parts. What a meta-step holds whatever the batch (the rater and one
meta-Adam state per inner model of this process, each inner model's parameters and Adam
state, and during a meta-step its tape, final state, adjoints and H v: parameter-sized vectors,
counted from the shapes); and what one micro-batch costs, measured: the hand-written
forward-over-reverse pass and a plain forward + backward of the inner model, run once at the
configured micro-batch size, precision and remat on the device itself. Time per meta-step is
the measured micro-step times the number of micro-batches of the T inner batches and the outer
one (rater passes and optimizer arithmetic left out: a few per cent at these sizes).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..meta.batch import SeqBatch, sequence_losses
from ..models import CausalLM, TransformerConfig
from ..models.forward_over_reverse import PassOptions
from .trainer import TrainConfig, compute_dtype

FLOAT = 4  # parameters, optimizer state and meta-gradients are float32
HEADROOM = 0.9  # of the device's memory (the allocator's fragmentation and the runtime's own)


@dataclass
class Estimate:
    """A dry run's verdict."""

    device: str
    fixed_bytes: int  # parameters, optimizer states and the meta-step's vectors
    micro_bytes: int  # one micro-batch's pass, measured
    capacity_bytes: int | None  # what the device has (None: unknown)
    step_seconds: float
    micro_batches: int
    advice: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.micro_bytes

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.peak_bytes <= HEADROOM * self.capacity_bytes

    def report(self) -> str:
        gb = 1e9
        cap = "unknown" if self.capacity_bytes is None else f"{self.capacity_bytes / gb:.1f} GB"
        lines = [
            f"device: {self.device} ({cap})",
            f"estimated peak per process: {self.peak_bytes / gb:.2f} GB "
            f"({self.fixed_bytes / gb:.2f} GB parameters, optimizer states and meta-step vectors "
            f"+ {self.micro_bytes / gb:.2f} GB for one micro-batch, measured)",
            f"estimated time per meta-step: {self.step_seconds:.2f} s "
            f"({self.micro_batches} micro-batches)",
            "fits" if self.fits else f"does NOT fit in {HEADROOM:.0%} of the device's memory",
        ]
        return "\n".join(lines + [f"  - {a}" for a in self.advice])


def fixed_bytes(cfg: TrainConfig, lm: TransformerConfig, rater: TransformerConfig,
                world: int, device: torch.device) -> int:  # fmt: skip
    """Parameter-sized vectors a process holds at a meta-step's peak (float32)."""
    p, r = lm.num_parameters(), rater.num_parameters(with_lm_head=False)
    mine = math.ceil(cfg.population / world)  # inner models on this process
    rater_side = r * (2 + 2 * mine)  # the rater, its gradient, a meta-Adam state per model
    models = 3 * p * mine  # each inner model's parameters and Adam state
    # in the meta-step of one of them: the tape (theta_t, s_t of steps 1..T-1; step 0 is the
    # caller's), the final state, the adjoints of theta and s with a_g, H v
    step = 3 * p * (cfg.inner_steps - 1) + 3 * p + 4 * p + p
    casts = 2 * 2 * p if compute_dtype(cfg.precision, device) else 0  # bf16 params + tangents
    return FLOAT * (rater_side + models + step) + casts


def capacity(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _peak(run, device: torch.device) -> tuple[int, float]:
    """Peak bytes above the start, and seconds, of ``run()`` (after one warm-up call)."""
    from ..profiling import peak_tensor_bytes

    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return peak_tensor_bytes(run)[0], seconds


def measure_micro_step(lm_cfg: TransformerConfig, cfg: TrainConfig, seq_len: int,
                       device: torch.device) -> tuple[int, float]:  # fmt: skip
    """(peak bytes, seconds) of one micro-batch: the pass, then a forward + backward."""
    lm = CausalLM(lm_cfg).to(device)
    micro = cfg.micro_batch_size or max(cfg.inner_batch, cfg.outer_batch)
    ids = torch.randint(0, lm_cfg.vocab_size, (micro, seq_len), device=device)
    batch = SeqBatch.from_dict({"input_ids": ids}, "dry run")
    params = {k: v.detach() for k, v in lm.named_parameters()}
    tangents = {k: torch.randn_like(v) * 1e-3 for k, v in params.items()}
    w = torch.full((micro,), 1.0 / micro, device=device)
    dtype = compute_dtype(cfg.precision, device)
    remat = cfg.remat == "block" or (cfg.remat == "auto" and device.type == "cuda")
    options = PassOptions(compute_dtype=dtype, remat=remat)

    def step():
        lm.hvp_and_tangents(params, tangents, ids, batch.targets, batch.token_weights, w, options)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        with autocast:
            loss = sequence_losses(lm(ids), batch).sum()
        loss.backward()
        lm.zero_grad(set_to_none=True)

    return _peak(step, device)


def estimate(cfg: TrainConfig, vocab: int, seq_len: int, device: str | torch.device,
             world: int = 1) -> Estimate:  # fmt: skip
    """The dry run of ``cfg`` with sequences of ``seq_len`` tokens on ``device``."""
    device = torch.device(device)
    lm_cfg = TransformerConfig(**{"vocab_size": vocab, "max_seq_len": seq_len, **cfg.lm})
    rater_cfg = TransformerConfig(**{"vocab_size": vocab, "max_seq_len": seq_len, **cfg.rater})
    micro_bytes, micro_s = measure_micro_step(lm_cfg, cfg, seq_len, device)
    micro = cfg.micro_batch_size or max(cfg.inner_batch, cfg.outer_batch)
    count = cfg.inner_steps * math.ceil(cfg.inner_batch / micro)
    count += math.ceil(cfg.outer_batch / micro)
    est = Estimate(str(device), fixed_bytes(cfg, lm_cfg, rater_cfg, world, device), micro_bytes,
                   capacity(device), micro_s * count * math.ceil(cfg.population / world),
                   count)  # fmt: skip
    if not est.fits:
        est.advice = advice(cfg, device)
    return est


def advice(cfg: TrainConfig, device: torch.device) -> list[str]:
    """What to change, in the order that costs least."""
    out = []
    if cfg.remat != "block" and not (cfg.remat == "auto" and device.type == "cuda"):
        out.append("set remat to 'block' (one transformer block's activations live at a time)")
    if compute_dtype(cfg.precision, device) is None:
        out.append("set precision to 'bf16' (the pass's activations in half the bytes)")
    micro = cfg.micro_batch_size or max(cfg.inner_batch, cfg.outer_batch)
    if micro > 1:
        out.append(f"lower micro_batch_size (now {micro}): activations scale with it")
    out.append("spread the population over more processes (torchrun), or use smaller models")
    return out
