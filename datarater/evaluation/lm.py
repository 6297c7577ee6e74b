"""Fresh language models trained on a selection of the data: the yardstick of curation.

``train_lm`` trains the library's causal LM for a fixed number of steps (so every arm sees the
same token budget) on batches drawn from a pool. With per-sequence scores, each batch is the
method's batch-level selection: draw ``ceil(N / (1 - rho))`` candidates, keep N of them (the
highest scores, the lowest, or the middle ones for the perplexity baselines).

FLOP counts are the usual estimates: a forward pass costs 2 FLOPs per matmul weight per token
plus the attention products (halved for causal attention); training costs 3 forward passes.
Embedding lookups are free.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..data.tokens import Sequences
from ..meta.batch import SeqBatch, sequence_losses
from ..models import CausalLM, TransformerConfig

KEEP = ("top", "bottom", "middle")


def forward_flops_per_token(cfg: TransformerConfig, causal: bool = True, head: int | None = None):
    """FLOPs of one forward pass per token at full context; ``head`` is the output width
    (the vocabulary for an LM, 1 for a rater)."""
    d, h = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    weights = cfg.n_layers * (4 * d * d + 2 * d * h) + d * (
        cfg.vocab_size if head is None else head
    )
    attention = 4 * cfg.n_layers * cfg.max_seq_len * d * (0.5 if causal else 1.0)
    return 2.0 * weights + attention


def train_flops_per_token(cfg: TransformerConfig) -> float:
    return 3.0 * forward_flops_per_token(cfg)


def pick(scores: Tensor, n: int, keep: str = "top") -> Tensor:
    """Indices of the ``n`` candidates to keep: highest, lowest or middle scores (ties: first)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    order = torch.sort(scores.double(), descending=keep != "bottom", stable=True).indices
    start = (len(scores) - n) // 2 if keep == "middle" else 0
    return order[start : start + n]


def candidates_per_batch(batch: int, rho: float) -> int:
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"discard fraction rho must be in [0, 1), got {rho}")
    return math.ceil(batch / (1.0 - rho) - 1e-9)


def peak_lr(cfg: TransformerConfig, lr: float) -> float:
    """``lr`` up to width 64, then scaled by 64 / width: wider models need smaller steps."""
    return lr * min(1.0, 64 / cfg.d_model)


@torch.inference_mode()
def sequence_nll(lm: CausalLM, seqs: Sequences, batch: int = 64) -> Tensor:
    """Mean next-token NLL of each sequence (its log-perplexity)."""
    out = []
    for i in range(0, len(seqs), batch):
        b = SeqBatch.from_dict(seqs.batch(torch.arange(i, min(i + batch, len(seqs)))), "batch")
        out.append(sequence_losses(lm(b.input_ids), b))
    return torch.cat(out) if out else torch.empty(0)


def train_lm(
    cfg: TransformerConfig,
    pool: Sequences,
    val: Sequences,
    steps: int,
    batch: int,
    seed: int,
    scores: Tensor | None = None,
    rho: float = 0.0,
    keep: str = "top",
    eval_every: int = 25,
    lr: float = 3e-3,
    on_step: Callable[[], None] | None = None,
) -> tuple[CausalLM, list[tuple[int, float]]]:
    """Train a fresh LM for ``steps`` steps of ``batch`` sequences; returns it and its
    validation-loss curve ``[(step, mean NLL)]`` (evaluated every ``eval_every`` steps and at
    the end). Same ``seed``: same initialisation and same candidate draws in every arm.

    Recipe: AdamW at ``peak_lr`` with 10 % linear warm-up and cosine decay to 10 %, gradients
    clipped to norm 1."""
    if scores is not None and len(scores) != len(pool):
        raise ValueError(f"need one score per sequence: {len(scores)} scores, {len(pool)} rows")
    if len(pool) == 0 or len(val) == 0:
        raise ValueError("the training pool and the validation set must not be empty")
    draw = batch if scores is None else candidates_per_batch(batch, rho)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = CausalLM(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=peak_lr(cfg, lr), weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))),
    )
    curve: list[tuple[int, float]] = []

    def evaluate(step: int) -> None:
        lm.eval()
        curve.append((step, float(sequence_nll(lm, val).mean())))
        lm.train()

    for step in range(steps):
        if step % eval_every == 0:
            evaluate(step)
        idx = torch.randint(0, len(pool), (draw,), generator=gen)
        if scores is not None:
            idx = idx[pick(scores[idx], batch, keep)]
        b = SeqBatch.from_dict(pool.batch(idx), "batch")
        loss = sequence_losses(lm(b.input_ids), b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step()
    evaluate(steps)
    return lm, curve
