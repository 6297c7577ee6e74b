"""Fresh language models trained on a selection of the data: the yardstick of curation.

``train_lm`` trains the library's causal LM for a fixed number of steps (so every arm sees the
same token budget) on batches drawn from a pool. With per-sequence scores, each batch is the
method's batch-level selection: draw ``ceil(N / (1 - rho))`` candidates, keep N of them (the
highest scores, the lowest, or the middle ones for the perplexity baselines).

FLOP counts are the usual estimates: a forward pass costs 2 FLOPs per matmul weight per token
plus the attention products; training costs 3 forward passes. Embedding lookups, norms and
activations are not counted (they are not matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..data.tokens import Sequences
from ..meta.batch import SeqBatch, sequence_losses
from ..models import CausalLM, TransformerConfig

KEEP = ("top", "bottom", "middle")


def forward_flops_per_token(cfg: TransformerConfig, head: int | None = None) -> float:
    """FLOPs of one forward pass per token at full context, as the model executes it (the
    written-out attention computes all n x n products, masked or not); ``head`` is the output
    width (the vocabulary for an LM, 1 for a rater)."""
    d, h = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    out = cfg.vocab_size if head is None else head
    weights = cfg.n_layers * (4 * d * d + 2 * d * h) + d * out
    return 2.0 * weights + 4.0 * cfg.n_layers * cfg.max_seq_len * d


def rater_flops_per_token(cfg: TransformerConfig) -> float:
    """A rater's forward FLOPs per token: the trunk, and its score head once per sequence."""
    return forward_flops_per_token(cfg, head=0) + 2.0 * cfg.d_model / cfg.max_seq_len


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


def sequence_nll(lm: CausalLM, seqs: Sequences, batch: int = 64) -> Tensor:
    """Mean next-token NLL of each sequence (its log-perplexity)."""
    with torch.inference_mode():  # fused attention; the result is cloned out of the mode
        out = []
        for i in range(0, len(seqs), batch):
            rows = torch.arange(i, min(i + batch, len(seqs)))
            b = SeqBatch.from_dict(seqs.batch(rows), "batch")
            out.append(sequence_losses(lm(b.input_ids), b))
        nll = torch.cat(out) if out else torch.empty(0)
    return nll.clone()


def token_nll(lm: CausalLM, seqs: Sequences) -> float:
    """NLL per target token over all of ``seqs`` (long and short sequences by their size)."""
    targets = seqs.loss_mask[:, 1:].sum(dim=1).double()
    return float((sequence_nll(lm, seqs).double() * targets).sum() / targets.sum())


class TrainedLM(NamedTuple):
    model: CausalLM
    curve: list[tuple[int, float]]  # (step, validation NLL per token)
    tokens: int  # target tokens trained on (padding excluded)


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
) -> TrainedLM:
    """Train a fresh LM for ``steps`` steps of ``batch`` sequences; returns it, its
    validation curve (evaluated every ``eval_every`` steps and at the end) and the target
    tokens it trained on.

    Arms with the same ``seed`` share the initialisation and the random candidates: step s
    draws a permutation of the pool from (seed, s) and takes its first ``ceil(N / (1 - rho))``
    rows (distinct), so an unfiltered run trains on the first N of the candidates a filtered
    run chooses from. Recipe: AdamW at ``peak_lr`` with 10 % linear warm-up and cosine decay
    to 10 %, gradients clipped to norm 1."""
    if scores is not None and len(scores) != len(pool):
        raise ValueError(f"need one score per sequence: {len(scores)} scores, {len(pool)} rows")
    if len(pool) == 0 or len(val) == 0:
        raise ValueError("the training pool and the validation set must not be empty")
    draw = batch if scores is None else candidates_per_batch(batch, rho)
    if draw > len(pool):
        raise ValueError(
            f"each step draws {draw} distinct candidates (batch {batch}, rho {rho}) but the "
            f"pool holds {len(pool)} sequences"
        )
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
    tokens = 0

    def evaluate(step: int) -> None:
        lm.eval()
        curve.append((step, token_nll(lm, val)))
        lm.train()

    for step in range(steps):
        if step % eval_every == 0:
            evaluate(step)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randperm(len(pool), generator=gen)[:draw]
        if scores is not None:
            idx = idx[pick(scores[idx], batch, keep)]
        b = SeqBatch.from_dict(pool.batch(idx), "batch")
        tokens += int(pool.loss_mask[idx, 1:].sum())
        loss = sequence_losses(lm(b.input_ids), b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step()
    evaluate(steps)
    return TrainedLM(lm, curve, tokens)
