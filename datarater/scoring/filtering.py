"""Turning scores into keep/discard decisions (design.md section 1, step 2).

Three rules, all deterministic:

* ``topk_groups``: batch-level top-K with oversampling. For discard fraction rho and nominal
  batch N, consecutive groups of ``N / (1 - rho)`` rows (stream order) keep their best
  ``floor((1 - rho) * group)`` rows; a trailing partial group keeps the same fraction.
* ``p_accept`` / ``accept``: the same decision for one row with no batch at hand. With p the
  row's position in the score CDF, a row survives a random batch of B rows keeping K if fewer
  than K of the other B - 1 rows score higher:
  ``P = sum_{s<K} C(B-1, s) (1-p)^s p^(B-1-s)``. Each row is then kept with that
  probability, drawn from a hash of (seed, row id): shards can be filtered independently and
  reproducibly.
* ``quantile_keep``: a global threshold keeping exactly ``round((1 - rho) n)`` rows; ties at
  the threshold are broken by row id, so the result never depends on input order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"discard fraction rho must be in [0, 1), got {rho}")


def group_size(batch: int, rho: float) -> int:
    """Rows drawn per nominal batch: N / (1 - rho), rounded to the nearest integer."""
    _check_rho(rho)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return max(batch, round(batch / (1.0 - rho)))


def _kept_per_group(group: int, rho: float) -> int:
    """floor((1 - rho) * group), and at least one: a group of one row at rho > 0 would
    otherwise keep nothing (top-K and P_accept alike)."""
    return max(1, math.floor((1.0 - rho) * group + 1e-9))


def _best(rows: Tensor, k: int) -> Tensor:
    """Keep mask of the k best entries of each row of ``rows`` [G, g]: descending score, ties
    to the earlier column (a stable sort), vectorised over groups."""
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
        keep.scatter_(1, order, True)
    return keep


def topk_groups(scores: Tensor, rho: float, batch: int) -> Tensor:
    """Boolean keep mask: the best floor((1 - rho) * group) rows (at least one) of each
    group, in order.

    Ties inside a group go to the earlier row.
    """
    g = group_size(batch, rho)
    scores = _finite(scores)
    full = len(scores) // g * g
    k = _kept_per_group(g, rho)
    tail = len(scores) - full
    parts = [_best(scores[:full].view(-1, g), k).flatten()]
    if tail:
        parts.append(_best(scores[full:].view(1, tail), _kept_per_group(tail, rho))[0])
    return torch.cat(parts)


def _finite(scores: Tensor) -> Tensor:
    """The scores as a CPU vector (where the keep masks are built), checked."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {tuple(scores.shape)}")
    scores = scores.detach().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).sum())} scores are NaN or infinite")
    return scores


class EmpiricalCDF:
    """F(score) from a sample of scores: the fraction of the sample strictly below, plus half
    of the ties (the mid-rank convention, so that a constant score gets p = 0.5)."""

    def __init__(self, sample: Tensor) -> None:
        if sample.numel() == 0:
            raise ValueError("the CDF needs at least one score")
        self.sorted = sample.detach().double().flatten().sort().values

    def __call__(self, scores: Tensor) -> Tensor:
        lo, hi = self.bounds(scores)
        return (lo + hi) / 2

    def bounds(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """The fractions of the sample below and at most each score: F(s-) and F(s)."""
        s = scores.detach().double()
        below = torch.searchsorted(self.sorted, s, right=False)
        upto = torch.searchsorted(self.sorted, s, right=True)
        n = len(self.sorted)
        return below.double() / n, upto.double() / n


def p_accept(p: Tensor, batch: int, keep: int) -> Tensor:
    """Probability that a row at CDF position p is among the top ``keep`` of ``batch`` rows."""
    if not 1 <= keep <= batch:
        raise ValueError(f"need 1 <= keep <= batch, got keep={keep}, batch={batch}")
    p = p.double().clamp(0.0, 1.0)
    n = batch - 1
    # P(fewer than `keep` of the n other rows score higher): binomial terms in log space, as
    # comb(n, s) overflows float64 past n ~ 1030 (and int64, times a tensor, far sooner);
    # xlogy gives 0 * log 0 = 0 at p = 0 or 1.
    total = torch.zeros_like(p)
    for s in range(keep):
        log_comb = math.lgamma(n + 1) - math.lgamma(s + 1) - math.lgamma(n - s + 1)
        total += torch.exp(log_comb + torch.xlogy(s, 1.0 - p) + torch.xlogy(n - s, p))
    return total.clamp(0.0, 1.0)


def _uniform(seed: int | str, ids: Sequence) -> Tensor:
    """A uniform number in [0, 1) per row id, from a hash: the same for the same (seed, id)."""
    out = []
    for i in ids:
        h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "big") / 2.0**64)
    return torch.tensor(out, dtype=torch.float64)


def accept(
    scores: Tensor, cdf: EmpiricalCDF, rho: float, batch: int, ids: Sequence, seed: int = 0
) -> Tensor:
    """Per-row keep mask with probability ``p_accept`` at the rate of batch-level top-K.

    A row's CDF position is drawn uniformly between F(s-) and F(s) of its score (from a
    second hash of its id): rows that tie (scores in bf16 often do) then spread over their
    block as a continuous score would, and the kept share stays (1 - rho) however many tie."""
    g = group_size(batch, rho)
    k = _kept_per_group(g, rho)
    if len(ids) != len(scores):
        raise ValueError(f"need one id per score, got {len(ids)} ids for {len(scores)} scores")
    lo, hi = cdf.bounds(scores)
    position = lo + _uniform(f"{seed}/ties", ids) * (hi - lo)
    return _uniform(seed, ids) < p_accept(position, g, k)


def quantile_keep(scores: Tensor, rho: float, ids: Sequence | None = None) -> Tensor:
    """Keep exactly round((1 - rho) n) rows with the highest scores; ties broken by id."""
    _check_rho(rho)
    scores = _finite(scores)
    n = len(scores)
    k = round((1.0 - rho) * n)
    # order by id first, then a stable sort by descending score: ties end in id order
    by_id = (
        torch.arange(n)
        if ids is None
        else torch.tensor(sorted(range(n), key=list(ids).__getitem__))
    )
    ranked = by_id[torch.sort(scores[by_id], descending=True, stable=True).indices]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[ranked[:k]] = True
    return keep
