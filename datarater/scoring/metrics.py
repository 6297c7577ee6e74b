"""Rank statistics shared by the demo and the analysis: AUC and Spearman correlation."""

from __future__ import annotations

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 1-based."""
    order = x.argsort()
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in x.unique():
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    r = ranks(torch.cat([pos, neg]).double())
    n1, n0 = len(pos), len(neg)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
