"""Analysis: heuristics, OLS R^2, the sparse fit names the driving feature."""

from __future__ import annotations

import json
import math

import torch

from datarater.scoring.analyze import HEURISTICS, explain, heuristics, write_report


def test_sparse_fit_names_the_feature_that_drives_the_score(tmp_path):
    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(200):  # upper-casing varies independently of length and spacing
        body = "word " * int(torch.randint(5, 60, (1,), generator=gen))
        frac = float(torch.rand(1, generator=gen))
        flips = torch.rand(len(body), generator=gen) < frac
        texts.append("".join(c.upper() if f else c for c, f in zip(body, flips.tolist())))
    x = heuristics(texts)
    assert x.shape == (200, len(HEURISTICS))
    upper = x[:, HEURISTICS.index("upper_fraction")]
    scores = -3.0 * upper + 0.01 * torch.randn(200, generator=gen, dtype=torch.float64)
    res = explain(texts, scores.float())
    assert res["ols_r2"] > 0.95
    assert res["pearson"]["upper_fraction"] < -0.9
    assert max(res["lasso"], key=lambda k: abs(res["lasso"][k])) == "upper_fraction"
    rep = write_report(
        tmp_path, texts, scores.float(), sources=["a", "b"] * 100, other_scores=scores.float()
    )
    assert rep["rank_correlation_with_other"] > 0.999
    assert rep["lowest"][0]["score"] <= rep["highest"][0]["score"]
    assert json.loads((tmp_path / "analysis.json").read_text())["n"] == 200
    assert (tmp_path / "score_histograms.png").stat().st_size > 0


def test_rank_correlation_stays_within_its_bounds():
    """Spearman of a vector with itself rounds to just above 1 for some lengths: clamped."""
    from datarater.scoring.analyze import rank_correlation
    from datarater.scoring.metrics import spearman

    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(n, generator=g) for n in range(5, 200)]
    assert any(spearman(x, x) > 1.0 for x in vectors)  # the rounding this guards against
    assert all(rank_correlation(x, x) <= 1.0 and rank_correlation(x, -x) >= -1.0 for x in vectors)


def test_rank_correlation_of_a_constant_vector_is_undefined():
    from datarater.scoring.analyze import rank_correlation

    assert math.isnan(rank_correlation(torch.ones(10), torch.randn(10)))
