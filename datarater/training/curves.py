"""A picture of a meta-training run, redrawn at every checkpoint: four curves say more about
whether the rater is learning than a log file does."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_save_png


def _running_mean(xs: list[float], k: int) -> list[float]:
    """Mean of the last k finite values at each point (NaN until there is one): the outer
    loss jumps whenever an inner model is re-initialised, so its trend needs smoothing.
    Linear in len(xs), whatever k."""
    finite = [x for x in xs if math.isfinite(x)]
    sums = [0.0]
    for x in finite:
        sums.append(sums[-1] + x)
    out, seen = [], 0
    for x in xs:
        seen += math.isfinite(x)
        lo = max(0, seen - k)
        out.append((sums[seen] - sums[lo]) / (seen - lo) if seen else float("nan"))
    return out


def plot_training(
    history: list[dict],
    path: Path | str,
    title: str = "Meta-training",
    batch: int | None = None,
    models: list[int] | None = None,
) -> None:
    """Outer and inner loss, the entropy of the batch weights (against ln ``batch``, that of
    uniform weights, when given) and each inner model's meta-gradient norm against the
    meta-step, as a PNG written atomically to ``path``. ``models`` names the inner models
    whose norms each row lists, in order (default 0, 1, ...)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    if not history:
        raise ValueError("no meta-steps to plot")
    steps = [row["step"] for row in history]

    def series(key: str) -> list[float]:
        return [float("nan") if row.get(key) is None else float(row[key]) for row in history]

    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2, sharex=True)
    smooth = max(1, len(steps) // 20)
    for ax, key, label in (
        (axes[0, 0], "outer_loss", "outer loss (held-out)"),
        (axes[0, 1], "inner_loss", "inner loss (rater-weighted)"),
    ):
        values = series(key)
        ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=0.8, label="per step")
        ax.plot(steps, _running_mean(values, smooth), color="tab:blue", label=f"mean of {smooth}")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, series("weight_entropy"), color="tab:green", label="rater weights")
    if batch is not None:
        ax.axhline(math.log(batch), color="grey", ls="--", lw=0.8, label="uniform weights")
        ax.legend(fontsize=8)
    ax.set_ylabel("entropy of the batch weights (nats)")
    ax.set_xlabel("meta-step")
    ax = axes[1, 1]
    count = max(len(row.get("meta_grad_norms") or []) for row in history)
    names = models if models is not None and len(models) == count else list(range(count))
    for m in range(count):
        values = []
        for row in history:
            norms = row.get("meta_grad_norms") or []
            x = norms[m] if m < len(norms) else None
            ok = isinstance(x, (int, float)) and math.isfinite(x) and x > 0
            values.append(x if ok else float("nan"))  # a skipped step leaves a gap
        ax.plot(steps, values, lw=0.8, label=f"inner model {names[m]}")
    ax.set_yscale("log")
    ax.set_ylabel("meta-gradient norm")
    ax.set_xlabel("meta-step")
    if 1 < count <= 8:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save_png(fig, path)
