"""Filtering rules: batch-level top-K, per-row P_accept, global quantile."""

from __future__ import annotations

import math

import pytest
import torch

from datarater.scoring import EmpiricalCDF, accept, group_size, p_accept, quantile_keep, topk_groups


@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_topk_keeps_exactly_its_share_of_every_full_group(rho):
    batch = 16
    g = group_size(batch, rho)
    scores = torch.randn(g * 7 + 3, generator=torch.Generator().manual_seed(1))
    keep = topk_groups(scores, rho, batch)
    k = math.floor((1 - rho) * g + 1e-9)
    for start in range(0, g * 7, g):
        block, kept = scores[start : start + g], keep[start : start + g]
        assert int(kept.sum()) == k
        assert block[kept].min() >= block[~kept].max()


def test_p_accept_matches_simulated_batches_and_keeps_the_right_share():
    gen = torch.Generator().manual_seed(0)
    batch, rho = 8, 0.5
    g = group_size(batch, rho)
    k = math.floor((1 - rho) * g)
    # exact check against simulation: a row at CDF position p among g - 1 uniform others
    for p in (0.1, 0.5, 0.9):
        others = torch.rand(200_000, g - 1, generator=gen)
        simulated = float(((others > p).sum(1) < k).double().mean())
        assert float(p_accept(torch.tensor([p]), g, k)) == pytest.approx(simulated, abs=0.01)
    # over many rows the kept share is (1 - rho) within sampling error
    n = 20_000
    scores = torch.randn(n, generator=gen)
    cdf = EmpiricalCDF(scores[:5000])
    kept = accept(scores, cdf, rho, batch, ids=range(n), seed=3)
    share = float(kept.double().mean())
    assert share == pytest.approx(1 - rho, abs=4 * math.sqrt(0.25 / n) + 0.01)
    # and it agrees with top-K about which rows are likely kept
    top = topk_groups(scores, rho, batch)
    agree = float((kept == top).double().mean())
    assert agree > 0.75
    assert float(scores[kept].mean()) > float(scores[~kept].mean()) + 1.0
    # deterministic: the same seed and ids give the same decisions, shard by shard
    again = torch.cat(
        [
            accept(scores[:7000], cdf, rho, batch, ids=range(7000), seed=3),
            accept(scores[7000:], cdf, rho, batch, ids=range(7000, n), seed=3),
        ]
    )
    assert torch.equal(kept, again)


@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9])
def test_p_accept_is_exact_at_large_batches(batch, rho):
    """Against exact rational arithmetic, where binomial coefficients overflow floats."""
    from fractions import Fraction

    g = group_size(batch, rho)
    k = math.floor((1 - rho) * g + 1e-9)
    ps = [Fraction(0), Fraction(1, 3), Fraction(1, 2), Fraction(9, 10), Fraction(97, 100), 1]
    got = p_accept(torch.tensor([float(p) for p in ps], dtype=torch.float64), g, k)
    n = g - 1
    for q, value in zip(ps, got.tolist()):  # small denominators keep the exact sums quick
        exact = sum(math.comb(n, s) * (1 - q) ** s * q ** (n - s) for s in range(k))
        assert value == pytest.approx(float(exact), abs=1e-10)
    n_rows = 5000
    scores = torch.randn(n_rows, generator=torch.Generator().manual_seed(1))
    kept = accept(scores, EmpiricalCDF(scores), rho, batch, ids=range(n_rows))
    tol = 4 * math.sqrt(rho * (1 - rho) / n_rows) + 0.01
    assert float(kept.double().mean()) == pytest.approx(1 - rho, abs=tol)
    # far past where binomial coefficients overflow: finite, in [0, 1], rising with p
    curve = p_accept(torch.linspace(0, 1, 101, dtype=torch.float64), 20_000, 10_000)
    assert curve.isfinite().all() and (curve >= 0).all() and (curve <= 1).all()
    assert (curve.diff() >= -1e-10).all() and curve[0] < 1e-9 and curve[-1] == 1


def test_quantile_threshold_breaks_ties_by_id_not_by_order():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 0.5])
    keep = quantile_keep(scores, rho=0.5)
    assert keep.tolist() == [False, True, True, False, True, False]
    perm = [5, 3, 0, 4, 1, 2]
    permuted = quantile_keep(scores[perm], rho=0.5, ids=perm)
    assert {perm[i] for i in range(6) if permuted[i]} == {1, 2, 4}


def test_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        group_size(8, 1.0)
    with pytest.raises(ValueError, match="keep"):
        p_accept(torch.tensor([0.5]), 4, 5)
    with pytest.raises(ValueError, match="one id per score"):
        accept(torch.zeros(3), EmpiricalCDF(torch.zeros(3)), 0.5, 4, ids=[1, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_rules_equal_a_plain_python_reference(seed):
    """Sorting by (-score, position or id) in plain Python, on scores with many ties."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 700, (1,), generator=gen))
    scores = torch.randint(0, 6, (n,), generator=gen).float() / 2  # few values: many ties
    rho, batch = [0.1, 0.5, 0.75][seed], [7, 16, 64][seed]

    def ref_topk():
        g, keep = group_size(batch, rho), torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, g):
            block = scores[start : start + g].tolist()
            k = math.floor((1 - rho) * len(block) + 1e-9)
            for i in sorted(range(len(block)), key=lambda i: (-block[i], i))[:k]:
                keep[start + i] = True
        return keep

    def ref_quantile(ids):
        keep = torch.zeros(n, dtype=torch.bool)
        order = sorted(range(n), key=lambda i: (-float(scores[i]), ids[i]))
        keep[order[: round((1 - rho) * n)]] = True
        return keep

    assert torch.equal(topk_groups(scores, rho, batch), ref_topk())
    assert torch.equal(quantile_keep(scores, rho), ref_quantile(list(range(n))))
    names = [f"shard-{(i * 7919) % n:05d}" for i in range(n)]  # ids in another order
    assert torch.equal(quantile_keep(scores, rho, ids=names), ref_quantile(names))
    with pytest.raises(ValueError, match="1 scores are NaN or infinite"):
        topk_groups(torch.tensor([0.0, float("nan")]), 0.5, 1)
    with pytest.raises(ValueError, match=r"one-dimensional, got shape \(3, 2\)"):
        quantile_keep(torch.zeros(3, 2), 0.5)


@pytest.mark.parametrize("rho", [0.75, 0.9])
def test_p_accept_keeps_its_share_when_scores_tie(rho):
    """bf16 scores tie often: here 30 % of rows share the top score (a saturated rater), the
    rest rounded to 1/8. Positions drawn inside each tied block keep the share at 1 - rho (a
    mid-rank CDF kept every tied row: 0.30 where 0.25 was asked)."""
    g = torch.Generator().manual_seed(3)
    n = 20_000
    scores = (torch.randn(n, generator=g) * 8).round() / 8
    scores[torch.rand(n, generator=g) < 0.3] = 100.0
    kept = accept(scores, EmpiricalCDF(scores), rho, 64, ids=range(n), seed=5)
    tol = 4 * math.sqrt(rho * (1 - rho) / n) + 0.005
    assert float(kept.double().mean()) == pytest.approx(1 - rho, abs=tol)
    again = accept(scores, EmpiricalCDF(scores), rho, 64, ids=range(n), seed=5)
    assert torch.equal(kept, again)  # deterministic under the seed


def test_a_group_of_one_keeps_its_row():
    """N = 1 at a small rho: the group is one row, and top-K and P_accept both keep it
    (floor would keep nothing)."""
    scores = torch.randn(10, generator=torch.Generator().manual_seed(0))
    assert topk_groups(scores, 0.1, 1).all()
    assert accept(scores, EmpiricalCDF(scores), 0.1, 1, ids=range(10)).all()
