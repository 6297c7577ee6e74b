"""``meta_step``: the gradient of a held-out loss with respect to a rater's parameters, taken
through T optimizer steps of an inner language model trained on rater-weighted batches; and
``weighted_steps``, the same inner training without it.

Two modes compute the same number: ``mixed`` (default, :mod:`.mixed`: forward-over-reverse,
memory flat in T) and ``reverse`` (:mod:`.reverse`: reverse-over-reverse, the oracle). The checks
and refusals run first, once per call (:mod:`.preflight`); both sweeps share one run context
(:mod:`.context`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..optim import InnerOptimizer
from . import preflight
from .batch import SeqBatch
from .context import Prepared, Run, all_finite, inner_grad, l2_norm
from .flat import state_in, state_out
from .mixed import mixed
from .options import HVP_PASSES, MODES, Options
from .reverse import reverse
from .state import InnerState

__all__ = ["HVP_PASSES", "MODES", "MetaStepResult", "NonFiniteMetaGradient", "meta_step",
           "weighted_steps"]  # fmt: skip


class NonFiniteMetaGradient(FloatingPointError):
    """The outer loss or the meta-gradient is NaN or infinite."""


@dataclass
class MetaStepResult:
    """What one ``meta_step`` did. ``.grad`` of the rater holds the meta-gradient itself."""

    state: InnerState
    outer_loss: float
    inner_losses: list[float]
    weights: list[Tensor]
    meta_grad_norm: float
    skipped: bool = False
    reason: str | None = None
    inner_grad_norms: list[float] = field(default_factory=list)


def meta_step(
    rater: nn.Module,
    model: nn.Module,
    state: InnerState,
    inner_batches: Sequence[Mapping[str, Tensor]],
    outer_batch: Mapping[str, Tensor],
    *,
    optimizer: InnerOptimizer,
    mode: str = "mixed",
    tau: float = 1.0,
    micro_batch_size: int | None = None,
    on_nonfinite: str = "raise",
    hvp: str = "auto",
    loss_backend: str | None = None,
    compute_dtype: torch.dtype | None = None,
    remat: str | None = "auto",
) -> MetaStepResult:
    """Accumulate d(outer loss)/d(rater parameters) into the rater's ``.grad``.

    For each of the T = ``len(inner_batches)`` batches: weights = softmax(rater scores / tau)
    over the batch, inner gradient of sum_i w_i * loss_i, one ``optimizer`` update of ``state``.
    The outer loss is the mean per-sequence loss on ``outer_batch`` at the final parameters.
    ``micro_batch_size`` splits every batch into chunks of at most that many rows; the
    batch-wide softmax weights stay exact, and so does the result (for raters whose scores do
    not depend on the rows beside them: BatchNorm in training mode is refused). ``hvp``
    (mixed mode): ``"auto"`` uses the model's hand-written forward-over-reverse pass when it
    has one (the library's ``CausalLM`` does), else ``"double"`` (one step's
    reverse-over-reverse); ``"func"`` uses ``torch.func.jvp`` of ``torch.func.grad``.
    ``loss_backend`` picks the cross-entropy kernel backend of the loss layer (default: the
    best available). ``compute_dtype=torch.bfloat16`` runs the inner model's matmuls,
    attention and loss inputs in bf16 (autocast's policy; a caller's ``torch.autocast`` region
    does the same), keeping parameters, optimizer state, the per-step records, adjoints and the
    meta-gradient in the parameters' dtype. ``remat="block"`` keeps only each transformer
    block's input in the hand-written pass and recomputes the block on the way back (one
    block's activations live at a time); ``None`` keeps them all; ``"auto"``: block on GPUs.
    """
    o = Options(mode, tau, micro_batch_size, on_nonfinite, hvp, loss_backend, compute_dtype,
                remat)  # fmt: skip
    o = preflight.with_autocast(o, state)
    c = preflight.check_meta_step(rater, model, state, inner_batches, outer_batch, optimizer, o)
    run = Run.build(rater, model, state, optimizer, o, c.phi)
    inner = Prepared(c.inner, c.inner_max_ids, c.dtype)
    sweep = mixed if mode == "mixed" else reverse
    with preflight.reworded_errors(mode, model, rater, c.max_id, c.length), _own_precision(run):
        with preflight.attention_with_higher_derivatives():
            new_state, outer_loss, inner_losses, gnorms, weights, meta = sweep(
                run, state, inner, c.outer
            )
    reason = _nonfinite(inner_losses, outer_loss, meta)
    if reason is not None:
        if on_nonfinite == "raise":
            raise NonFiniteMetaGradient(f"meta_step: {reason} (pass on_nonfinite='skip' to skip)")
        if not all_finite(new_state.params.values()):
            new_state = state
        return MetaStepResult(new_state, outer_loss, inner_losses, weights, float("nan"), True,
                              reason, gnorms)  # fmt: skip
    for p, g in zip(c.phi, meta):
        p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
    return MetaStepResult(new_state, outer_loss, inner_losses, weights, l2_norm(meta), False,
                          None, gnorms)  # fmt: skip


def _own_precision(run: Run):
    """meta_step's own ops (optimizers, the rater, the sweeps' sums) outside any autocast
    region of the caller's: only the inner model's forward passes take the compute dtype."""
    return torch.autocast(run.fl.device.type, enabled=False)


def _nonfinite(inner_losses: list[float], outer_loss: float, meta: list[Tensor]) -> str | None:
    """Why the result cannot be used (None: it can)."""
    bad_step = next((t for t, x in enumerate(inner_losses) if not math.isfinite(x)), None)
    if bad_step is not None:
        return f"the inner loss of step {bad_step} is {inner_losses[bad_step]}"
    if not math.isfinite(outer_loss):
        return f"outer loss is {outer_loss}"
    if not all_finite(meta):
        return "meta-gradient has NaN or inf entries"
    return None


def weighted_steps(
    rater: nn.Module,
    model: nn.Module,
    state: InnerState,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    optimizer: InnerOptimizer,
    tau: float = 1.0,
    micro_batch_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> InnerState:
    """Plain inner training on rater-weighted batches, no meta-gradient: what inner models do
    between meta-updates. Same weighting and update as ``meta_step``'s forward sweep (its
    ``compute_dtype`` too), and the same checks of its arguments."""
    o = Options(tau=tau, micro_batch_size=micro_batch_size, compute_dtype=compute_dtype)
    o = preflight.with_autocast(o, state)
    preflight.check_options(o)
    preflight.check_common(model, state, optimizer, tau, micro_batch_size)
    if isinstance(batches, Mapping):  # any iterable of batches (a loader), but not one batch
        raise TypeError("batches must be an iterable of batches (one per step), not one batch")
    if micro_batch_size is not None:
        preflight.refuse_batch_statistics(rater)
    run = Run.build(rater, model, state, optimizer, o, [])
    fl, opt = run.fl, run.opt
    theta, s, step = fl.flat(state.params), state_in(opt, fl, state.opt_state), state.step
    with _own_precision(run):
        theta, s, step = _weighted_loop(run, model, batches, theta, s, step)
    return InnerState(fl.views(theta), run.buffers, state_out(opt, fl, s), step)


def _weighted_loop(run: Run, model: nn.Module, batches, theta, s, step):
    fl, opt = run.fl, run.opt
    for t, raw in enumerate(batches):
        batch = SeqBatch.from_dict(raw, f"batches[{t}]").to(theta.dtype)
        _check_ids(model, batch, f"batches[{t}]")
        with torch.no_grad():
            w = torch.softmax(run.scores(batch).to(theta.dtype) / run.tau, 0)
        g, _ = inner_grad(run, theta, batch, w)
        with torch.no_grad():
            new, s = opt.update(fl.wrap(theta), fl.wrap(g), s, step + 1)
        theta, step = new[fl.KEY], step + 1
    return theta, s, step


def _check_ids(model: nn.Module, batch: SeqBatch, name: str) -> None:
    vocab = preflight.declared_vocab(model)
    if vocab is not None and batch.max_id >= vocab:
        raise ValueError(
            f"{name}: token id {batch.max_id} is out of range for the model's vocabulary of {vocab}"
        )
