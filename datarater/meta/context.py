"""What one ``meta_step`` (or ``weighted_steps``) call holds fixed, shared by both sweeps: the
models, the optimizer on the flat vector, the batches prepared when used, and the inner
gradient."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..models.forward_over_reverse import PassOptions
from ..optim import InnerOptimizer, State
from .batch import SeqBatch, logits_of, sequence_losses
from .flat import Flat, OnViews, on_flat
from .options import Options
from .preflight import check_scores, refuse_randomness
from .state import InnerState


@dataclass
class Run:
    """Everything one meta_step call holds fixed."""

    rater: nn.Module
    model: nn.Module
    opt: InnerOptimizer | OnViews
    tau: float
    micro: int | None
    hvp: str
    loss_backend: str | None
    phi: list[Tensor]
    buffers: dict[str, Tensor]
    fl: Flat
    compute_dtype: torch.dtype | None = None  # the inner model's matmuls (None: its own)
    remat: str | None = None
    check_graph: bool = True  # the first backward with a graph is checked for cuts

    @classmethod
    def build(cls, rater, model, state: InnerState, optimizer, o: Options, phi) -> Run:
        """The run of one call: the optimizer on the flat vector, copies of the buffers."""
        fl = Flat(state.params)
        return cls(rater, model, on_flat(optimizer, fl), float(o.tau), o.micro_batch_size,
                   o.hvp, o.loss_backend, phi, own_buffers(state), fl, o.compute_dtype,
                   o.remat)  # fmt: skip

    @property
    def pass_options(self) -> PassOptions:
        """What a model's hand-written forward-over-reverse pass is told. ``remat="auto"``
        rematerialises blocks on GPUs, where memory binds (a third more of the pass's
        matmuls for one block's activations instead of all), not on CPUs, where time does."""
        remat = self.remat == "block" or (self.remat == "auto" and self.fl.device.type == "cuda")
        return PassOptions(self.loss_backend, self.compute_dtype, remat)

    def autocast(self):
        """The inner model's forward in the compute dtype (autocast's policy: matmuls in it,
        reductions and norms in float32); nothing where there is none."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        device = self.fl.device
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def first_graph_check(self) -> bool:
        """True the first time it is asked in a call: that backward is checked for cuts."""
        check, self.check_graph = self.check_graph, False
        return check

    def scores(self, batch: SeqBatch) -> Tensor:
        return torch.cat(
            [check_scores(self.rater(mb.input_ids), mb.size) for mb in batch.split(self.micro)]
        )

    def losses(self, params, batch: SeqBatch) -> Tensor:
        with self.autocast():
            args = (params, self.buffers), (batch.input_ids,)
            out = functional_call(self.model, *args, strict=False)
            return sequence_losses(logits_of(out), batch, backend=self.loss_backend)

    def micro_batches(self, batch: SeqBatch, w: Tensor):
        """Pairs (micro-batch, its slice of the batch-wide weights)."""
        start = 0
        for mb in batch.split(self.micro):
            yield mb, w[start : start + mb.size]
            start += mb.size


@dataclass
class Tape:
    """What the forward sweep keeps of one inner step (no activations)."""

    params: Tensor  # theta_t, flat
    opt_state: State  # s_t, flat
    grads: Tensor | None  # g_t, kept only when the optimizer cannot rebuild it
    clip: Tensor | None
    weights: Tensor
    step: int


class Prepared:
    """The inner batches as a sequence of SeqBatch, each built (checked once before) when it
    is used."""

    def __init__(
        self, batches: Sequence[Mapping[str, Tensor]], max_ids: list[int], dtype: torch.dtype
    ) -> None:
        self.batches, self.max_ids, self.dtype = batches, max_ids, dtype

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, t: int) -> SeqBatch:
        return SeqBatch.build(self.batches[t], self.max_ids[t]).to(self.dtype)

    def __iter__(self):
        return (self[t] for t in range(len(self)))


def own_buffers(state: InnerState) -> dict[str, Tensor]:
    """Copies of the state's buffers: a model that updates buffers in its forward pass
    (running statistics) must not change the caller's state, which stays what it was."""
    return {k: v.clone() for k, v in state.buffers.items()}


def on_host(scalars: list[Tensor]) -> list[float]:
    """0-dim tensors (on one device or several) as Python floats, in one read per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(scalars):
        by_device.setdefault(x.device, []).append(i)
    out = [0.0] * len(scalars)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([scalars[i].double() for i in idx]).tolist()):
            out[i] = v
    return out


def all_finite(tensors) -> bool:
    return all(v == 1.0 for v in on_host([torch.isfinite(t).all() for t in tensors]))


def l2_norm(tensors) -> float:
    return math.sqrt(sum(on_host([t.double().pow(2).sum() for t in tensors])))


def inner_grad(run: Run, theta: Tensor, batch: SeqBatch, w: Tensor, watch: bool = False):
    """Flat gradient of sum_i w_i l_i at theta, summed over micro-batches; and its value (a
    float64 tensor on theta's device: read back once per call, not once per step).
    ``watch``: refuse a first forward pass that runs random ops (``refuse_randomness``)."""
    total, loss = None, 0.0
    for mb, wm in run.micro_batches(batch, w):
        leaves = {k: v.detach().requires_grad_(True) for k, v in run.fl.views(theta).items()}
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            with refuse_randomness("model", watch):
                obj = (wm * run.losses(leaves, mb)).sum()
            g = torch.autograd.grad(
                obj, list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        watch = False
        g = run.fl.flat(g)
        total = g if total is None else total + g
        loss = obj.detach().double() + loss
    return total, loss
