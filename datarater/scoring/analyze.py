"""What did the rater learn? Scores against simple text heuristics, extremes, stability.

``heuristics`` computes per-document features; ``explain`` fits an ordinary least-squares
model of the score on all of them (R^2) and a sparse L1 (lasso) fit that names the few that
matter; ``rank_correlation`` compares two raters' (or checkpoints') scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .metrics import spearman

HEURISTICS = (
    "chars",
    "words",
    "lines",
    "non_alnum_fraction",
    "unique_char_fraction",
    "whitespace_fraction",
    "upper_fraction",
    "digit_fraction",
    "mean_word_length",
    "non_printable_fraction",
)


def heuristics(texts: Sequence[str]) -> Tensor:
    """[n_docs, len(HEURISTICS)] float64 features."""
    rows = []
    for t in texts:
        n = max(1, len(t))
        words = t.split()
        rows.append(
            [
                math.log1p(len(t)),
                math.log1p(len(words)),
                math.log1p(t.count("\n") + 1),
                sum(not (c.isalnum() or c.isspace()) for c in t) / n,
                len(set(t)) / n,
                sum(c.isspace() for c in t) / n,
                sum(c.isupper() for c in t) / n,
                sum(c.isdigit() for c in t) / n,
                sum(map(len, words)) / max(1, len(words)),
                sum(not c.isprintable() and c not in "\n\t" for c in t) / n,
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)


def _standardize(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-12)


def ols_r2(x: Tensor, y: Tensor) -> float:
    """R^2 of an ordinary least-squares fit of y on x (with intercept)."""
    x = x[:, x.std(0) > 0]  # constant features carry nothing and make the system singular
    xs = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), _standardize(x)], 1)
    beta = torch.linalg.lstsq(xs, y.double()[:, None], driver="gelsd").solution
    resid = y.double() - (xs @ beta)[:, 0]
    return float(1 - resid.pow(2).sum() / (y.double() - y.double().mean()).pow(2).sum())


def lasso(x: Tensor, y: Tensor, alpha: float, iters: int = 500) -> Tensor:
    """Coordinate-descent lasso on standardized features; coefficients per feature."""
    xs, yc = _standardize(x), y.double() - y.double().mean()
    n, d = xs.shape
    beta = torch.zeros(d, dtype=torch.float64)
    col_sq = xs.pow(2).sum(0) / n
    for _ in range(iters):
        for j in range(d):
            if float(col_sq[j]) == 0.0:  # a constant feature explains nothing
                continue
            r = yc - xs @ beta + xs[:, j] * beta[j]
            rho = float(xs[:, j] @ r) / n
            beta[j] = math.copysign(max(abs(rho) - alpha, 0.0), rho) / float(col_sq[j])
    return beta


def explain(texts: Sequence[str], scores: Tensor, alpha: float | None = None) -> dict:
    """Correlations, OLS R^2 and a sparse fit naming the heuristics that explain the score."""
    x, y = heuristics(texts), scores.double()
    corr = {}
    for j, name in enumerate(HEURISTICS):
        xc, yc = x[:, j] - x[:, j].mean(), y - y.mean()
        denom = float(xc.norm() * yc.norm())
        corr[name] = float(xc @ yc) / denom if denom > 0 else 0.0
    alpha = alpha if alpha is not None else 0.1 * float(y.std())
    beta = lasso(x, y, alpha)
    return {
        "pearson": corr,
        "ols_r2": ols_r2(x, y),
        "lasso": {n: float(b) for n, b in zip(HEURISTICS, beta) if abs(float(b)) > 1e-9},
        "lasso_alpha": alpha,
    }


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman correlation of two score vectors (stability across checkpoints), clamped to
    [-1, 1] against rounding; NaN where it is undefined (a constant vector)."""
    r = spearman(a, b)
    return r if r != r else min(1.0, max(-1.0, r))


def extremes(
    texts: Sequence[str],
    scores: Tensor,
    k: int = 10,
    chars: int = 200,
    sources: Sequence | None = None,
    rows: Sequence[int] | None = None,
) -> dict:
    """The k lowest- and highest-scored texts (cut to ``chars``), with their source if known
    and their ``row``: ``rows[i]`` (a position in the scored folder) or i."""
    order = scores.argsort()
    position = range(len(texts)) if rows is None else rows

    def pick(idx: list[int]) -> list[dict]:
        picked = [
            {"score": float(scores[i]), "row": int(position[i]), "text": texts[i][:chars]}
            for i in idx
        ]
        if sources is not None:
            for row, i in zip(picked, idx):
                row["source"] = str(sources[i])
        return picked

    return {"lowest": pick(order[:k].tolist()), "highest": pick(order.flip(0)[:k].tolist())}


MISSING = "(missing)"  # the group of rows whose source value is null


def write_report(
    out: Path,
    texts: Sequence[str],
    scores: Tensor,
    sources: Sequence | None = None,
    other_scores: Tensor | None = None,
    rows: Sequence[int] | None = None,
    total: int | None = None,
    compared: dict | None = None,
) -> dict:
    """``analysis.json``, ``analysis.md`` (the same, for reading) and
    ``score_histograms.png`` (one histogram per source, or one for all) in ``out``. ``rows``
    and ``total``: the texts are a sample of ``total`` rows, at these positions; ``compared``
    says how ``other_scores`` were obtained (which rater, which options)."""
    import matplotlib

    from ..io import atomic_save_png, atomic_write_text

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    if sources is not None:
        sources = [MISSING if x is None else str(x) for x in sources]
    report = {
        "n": len(texts),
        "total": len(texts) if total is None else total,
        **explain(texts, scores),
        **extremes(texts, scores, sources=sources, rows=rows),
    }
    if other_scores is not None:
        report["rank_correlation_with_other"] = rank_correlation(scores, other_scores)
        report["compared_with"] = compared or {}
    groups = {"all": list(range(len(texts)))}
    if sources is not None:
        groups = {s: [i for i, x in enumerate(sources) if x == s] for s in sorted(set(sources))}
        report["mean_score_by_source"] = {s: float(scores[i].mean()) for s, i in groups.items()}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, idx in groups.items():
        ax.hist(scores[idx].numpy(), bins=30, alpha=0.5, density=True, label=name)
    ax.set_xlabel("rater score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_png(fig, out / "score_histograms.png")
    plt.close(fig)
    atomic_write_text(out / "analysis.json", json.dumps(report, indent=1))
    atomic_write_text(out / "analysis.md", markdown(report))
    return report


def _cell(text: str, chars: int = 120) -> str:
    """A text as one markdown table cell: one line, pipes escaped, cut."""
    flat = " ".join(text.split())
    flat = flat if len(flat) <= chars else flat[: chars - 1] + "…"
    return flat.replace("|", "\\|") or "(empty)"


def markdown(report: dict) -> str:
    """The analysis as a page: what explains the scores, then the extremes."""
    lines = [
        "# What the rater learned",
        "",
        f"{report['n']} scored documents"
        + (f" (a uniform sample of {report['total']})." if report["total"] > report["n"] else "."),
        "",
        "![score histograms](score_histograms.png)",
        "",
        "## Text heuristics",
        "",
        f"OLS R^2 of the score on all heuristics: **{report['ols_r2']:.3f}**. The sparse (L1, "
        f"alpha {report['lasso_alpha']:.3g}) fit keeps: "
        + (", ".join(f"{k} ({v:+.3g})" for k, v in report["lasso"].items()) or "none")
        + ".",
        "",
        "| heuristic | Pearson r with the score |",
        "|---|---|",
    ]
    ranked = sorted(report["pearson"].items(), key=lambda kv: -abs(kv[1]))
    lines += [f"| {k} | {v:+.3f} |" for k, v in ranked]
    if "mean_score_by_source" in report:
        lines += ["", "## Mean score by source", "", "| source | mean score |", "|---|---|"]
        lines += [f"| {_cell(k)} | {v:+.4f} |" for k, v in report["mean_score_by_source"].items()]
    if "rank_correlation_with_other" in report:
        r, how = report["rank_correlation_with_other"], report.get("compared_with", {})
        said = ", ".join(f"{k} {v}" for k, v in how.items() if k != "rater")
        lines += [
            "",
            f"Spearman rank correlation with {how.get('rater', 'the other rater')} "
            f"(scored again{', ' + said if said else ''}): **{r:.4f}**.",
        ]
    for side in ("lowest", "highest"):
        rows = report[side]
        has_source = bool(rows) and "source" in rows[0]
        lines += ["", f"## {side.capitalize()}-scored documents", ""]
        lines += ["| score | row | " + ("source | " if has_source else "") + "text |"]
        lines += ["|---|---|" + ("---|" if has_source else "") + "---|"]
        for row in rows:
            src = f"{_cell(row['source'], 30)} | " if has_source else ""
            lines.append(f"| {row['score']:+.4f} | {row['row']} | {src}{_cell(row['text'])} |")
    lines += [
        "",
        "A row is a document's position in the scored folder, parts in order "
        "(`datarater.scoring.score.read_scored`).",
    ]
    return "\n".join(lines) + "\n"
