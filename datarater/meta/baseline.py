"""PyTorch's own reverse-over-reverse: the meta-gradient as a user writes it without datarater.

The benchmarks compare ``meta_step`` with this loop, and the tests use it as an oracle that
shares only the batch format (``SeqBatch``) and the optimizer's update formulas with
``meta_step``: one tensor per parameter (no flat vector), the model through
``functional_call``, autograd's own cross-entropy (no datarater kernels), every optimizer step
kept in the graph (``create_graph=True``), one backward of the outer loss through all T
steps. Its memory grows with T: every step's activations and the graph of its backward stay
alive until that last backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..optim import InnerOptimizer
from .batch import SeqBatch, logits_of
from .state import InnerState


def _sequence_losses(model: nn.Module, params, buffers, batch: SeqBatch) -> Tensor:
    logits = logits_of(functional_call(model, (params, buffers), (batch.input_ids,)))
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    return (batch.token_weights * ce.view_as(batch.token_weights)).sum(1)


def torch_reverse_over_reverse(
    rater: nn.Module,
    model: nn.Module,
    state: InnerState,
    inner_batches: Sequence[Mapping[str, Tensor]],
    outer_batch: Mapping[str, Tensor],
    *,
    optimizer: InnerOptimizer,
    tau: float = 1.0,
) -> tuple[list[Tensor], float]:
    """d(outer loss)/d(rater parameters) and the outer loss, by plain reverse-over-reverse.

    The same objective as :func:`~datarater.meta_step`: softmax(scores / tau) weights over each
    inner batch, one ``optimizer`` update per batch, the mean per-sequence loss on
    ``outer_batch`` at the end. Attention runs PyTorch's math kernels (its fused ones have no
    double backward). Returns gradients for the rater's parameters that require grad; the
    rater's ``.grad`` is left alone.
    """
    phi = [p for p in rater.parameters() if p.requires_grad]
    if not phi or not inner_batches:
        raise ValueError("the baseline needs a rater with trainable parameters and >= 1 batch")
    params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    dtype = next(iter(params.values())).dtype
    buffers = {k: v.clone() for k, v in state.buffers.items()}
    opt_state, step = state.opt_state, state.step
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for t, raw in enumerate(inner_batches):
            batch = SeqBatch.from_dict(raw, f"inner_batches[{t}]").to(dtype)
            w = torch.softmax(rater(batch.input_ids).to(dtype) / tau, 0)
            objective = (w * _sequence_losses(model, params, buffers, batch)).sum()
            grads = torch.autograd.grad(objective, list(params.values()), create_graph=True)
            params, opt_state = optimizer.update(
                params, dict(zip(params, grads)), opt_state, t + step + 1
            )
        outer = SeqBatch.from_dict(outer_batch, "outer_batch").to(dtype)
        outer_loss = _sequence_losses(model, params, buffers, outer).mean()
        meta = torch.autograd.grad(outer_loss, phi, allow_unused=True, materialize_grads=True)
    return list(meta), float(outer_loss.detach())
