"""A picture of a meta-training run, redrawn at every checkpoint: four curves say more about
whether the rater is learning than a log file does."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _running_mean(xs: list[float], k: int) -> list[float]:
    """Mean of the last k finite values at each point (NaN until there is one): the outer
    loss jumps whenever an inner model is re-initialised, so its trend needs smoothing."""
    out, window = [], []
    for x in xs:
        if math.isfinite(x):
            window.append(x)
            window = window[-k:]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def plot_training(
    history: list[dict],
    path: Path | str,
    title: str = "Meta-training",
    batch: int | None = None,
) -> None:
    """Outer and inner loss, the entropy of the batch weights (against ln ``batch``, that of
    uniform weights, when given) and each inner model's meta-gradient norm against the
    meta-step, as a PNG written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("no meta-steps to plot")
    steps = [row["step"] for row in history]

    def series(key: str) -> list[float]:
        return [float("nan") if row.get(key) is None else float(row[key]) for row in history]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
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
    models = max(len(row.get("meta_grad_norms", [])) for row in history)
    for m in range(models):
        norms = [(row.get("meta_grad_norms") or [])[m : m + 1] for row in history]
        values = [n[0] if n and math.isfinite(n[0]) and n[0] > 0 else float("nan") for n in norms]
        ax.plot(steps, values, lw=0.8, label=f"inner model {m}")
    ax.set_yscale("log")
    ax.set_ylabel("meta-gradient norm")
    ax.set_xlabel("meta-step")
    if 1 < models <= 8:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
