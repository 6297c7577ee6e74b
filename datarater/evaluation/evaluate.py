"""``datarater evaluate``: does the curated data pay for itself?

Fresh language models of two or more sizes are trained with the same token budget on the raw
pool and on rater-selected batches (batch-level top-K, design.md section 1); their validation
NLL curves give the compute the filtered run needs to reach the raw run's final validation NLL.
The *net compute gain* counts what selection costs on top: the scorer's inference FLOPs on
every candidate token, oversampling included. Fixed costs (meta-training the rater, training the
reference LM of the perplexity baselines) are reported apart, as the method's papers do.

Protocol: the discard fraction rho is swept with the smallest model and the best rho (lowest
final validation NLL) is used for the larger sizes and for the perplexity baselines (keep the
lowest, middle or highest perplexity of each oversampled batch, perplexity from a reference LM
trained on one half of the validation corpus; the other half is the validation set).

Every finished run is kept in ``out/runs/`` (its curve in JSON; the reference LM's
perplexities in safetensors), so an evaluation stopped by a crash, rerun with the same data and
settings, trains only what was left and reports what an uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..data.tokens import Sequences, overlap, per_document, split_heldout
from ..io import atomic_save_png, atomic_write, atomic_write_text, digest
from ..models import TransformerConfig, preset
from ..models.transformer import PRESETS
from ..runs import RunFolder
from .lm import (
    candidates_per_batch,
    forward_flops_per_token,
    rater_flops_per_token,
    sequence_nll,
    train_flops_per_token,
    train_lm,
)

RHOS = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class EvalConfig:
    sizes: Sequence[str] = ("tiny", "small")  # model presets, smallest first
    rhos: Sequence[float] = RHOS
    steps: int = 300  # per run: the token budget is steps x batch x seq_len
    batch: int = 16
    seq_len: int = 64
    eval_every: int = 25
    lr: float = 3e-3
    seed: int = 0
    max_windows: int = 4  # training windows per document
    baselines: bool = True  # perplexity-filter baselines at the best rho
    repeats: int = 1  # seeds per run; the curves are averaged (small runs are noisy)

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("evaluate needs at least one model size")
        if not self.rhos:
            raise ValueError("evaluate needs at least one rho to sweep")
        for r in self.rhos:
            if not 0.0 < r < 1.0:
                raise ValueError(f"every rho must be in (0, 1), got {r}")
        for name in ("steps", "batch", "eval_every", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        unknown = [s for s in self.sizes if s not in PRESETS]
        if unknown:
            raise ValueError(f"unknown model size(s) {unknown}; choose from {sorted(PRESETS)}")


@dataclass
class Run:
    """One training run: which data selection, on which model size, and its curve."""

    size: str
    arm: str  # "unfiltered", "datarater", "ppl-low", "ppl-mid", "ppl-high", "given"
    rho: float
    scorer_flops_per_candidate_token: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: float = 0.0  # target tokens trained on (mean over repeats)
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.arm if self.arm == "unfiltered" else f"{self.arm} rho={self.rho:.3g}"


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches ``target`` (linear between evaluations)."""
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def compute_gain(
    run: Run, baseline: Run, train_flops: float, batch: int, scorer_candidates: int
) -> dict:
    """Compute of ``run`` to reach ``baseline``'s final NLL, as a fraction of the baseline's.

    ``scorer_candidates`` candidates are scored per ``batch`` trained sequences. Both curves
    are read alike: the first step at which each reaches the target (a noisy baseline that
    dips below its own end is charged only up to there too), and a run that ends above the
    target has not reached it, whatever it touched on the way.
    """
    target = baseline.curve[-1][1]
    total = steps_to_reach(baseline.curve, target)  # its own first passage (at most its end)
    s = steps_to_reach(run.curve, target) if run.curve[-1][1] <= target else None
    scoring = run.scorer_flops_per_candidate_token * scorer_candidates / batch
    out = {
        "final_nll": run.curve[-1][1],
        "target_nll": target,
        "steps_to_target": s,
        "scoring_overhead": scoring / train_flops,
    }
    if s is None or not total:
        out.update(compute_fraction=None, gross_gain=None, net_compute_gain=None)
    else:
        fraction = s * (train_flops + scoring) / (total * train_flops)
        out.update(
            compute_fraction=fraction, gross_gain=1 - s / total, net_compute_gain=1 - fraction
        )
    return out


def lm_config(size: str, vocab_size: int, seq_len: int) -> TransformerConfig:
    return preset(size, vocab_size=vocab_size, max_seq_len=seq_len)


def _check_setup(texts, val_texts, rater_cfg, cfg: EvalConfig, vocab: int) -> list[str]:
    """Sizes must grow (the protocol sweeps on the smallest and reports the largest); and the
    warnings, also kept for the report, for what makes a result misleading without making it
    impossible: validation documents in the pool (the filtered arm may just select them),
    LMs no larger than the rater (scoring every candidate then costs about as much as
    training on it), curves with too few points to read a compute fraction from."""
    costs = [forward_flops_per_token(lm_config(s, vocab, cfg.seq_len)) for s in cfg.sizes]
    if any(b <= a for a, b in zip(costs, costs[1:])):
        listed = ", ".join(f"{s} {c / 1e6:.2f}" for s, c in zip(cfg.sizes, costs))
        raise ValueError(
            f"sizes must go from smallest to largest (forward MFLOP per token: {listed})"
        )
    said = []
    dup = overlap(texts, val_texts)
    if dup:
        said.append(
            f"{dup} of {len(val_texts)} validation documents also occur in the scored pool: "
            "keep the held-out corpus disjoint, or the gain may be the rater finding them"
        )
    rater_cost = forward_flops_per_token(rater_cfg, head=0)
    for size, cost in zip(cfg.sizes, costs):
        if cost <= rater_cost:
            said.append(
                f"LM size {size!r} costs {cost / 1e6:.2f} MFLOP per token, no more than the "
                f"rater's {rater_cost / 1e6:.2f}: scoring eats any gain; use larger sizes"
            )
    points = len(set(range(0, cfg.steps + 1, cfg.eval_every)) | {cfg.steps})  # the last too
    if points < 5:
        said.append(
            f"each curve has {points} points ({cfg.steps} steps, evaluated every "
            f"{cfg.eval_every}): compute fractions read off it are coarse; evaluate more often"
        )
    for text in said:
        warnings.warn(text, stacklevel=3)
    return said


class _Finished:
    """The finished runs of one evaluation under ``folder``: a JSON file per run, written
    atomically when the run ends, and ``settings.json``, what every run depends on. A rerun
    with the same settings loads them; a folder holding another evaluation's runs is refused,
    with what differs."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = folder
        path = folder / "settings.json"
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() and any(folder.glob("*-rho*.json")):
            raise ValueError(
                f"{folder} holds finished runs but no settings.json: they cannot be matched to "
                f"this evaluation; delete {folder} to start over"
            )
        try:  # created only if absent, whole: of two evaluations started at once, one wins
            atomic_write_text(path, json.dumps(settings, indent=1), exclusive=True)
        except FileExistsError:
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"{path} is unreadable ({e}); delete {folder} to start over"
                ) from e
            what = _differences(old, settings)
            if what:
                raise ValueError(
                    f"{folder} holds the runs of an evaluation with other settings or data "
                    f"({'; '.join(what[:6])}); use another --out, or delete {folder} to start "
                    "over"
                ) from None

    def _path(self, key: str, suffix: str = ".json") -> Path:
        return self.folder / f"{key}{suffix}"

    def load(self, run: Run) -> bool:
        path = self._path(self.key(run))
        if not path.exists():
            return False
        kept = json.loads(path.read_text())
        run.curve = [(int(s), float(nll)) for s, nll in kept["curve"]]
        run.tokens = float(kept["tokens"])
        return True

    def save(self, run: Run) -> None:
        kept = {"curve": run.curve, "tokens": run.tokens}
        atomic_write_text(self._path(self.key(run)), json.dumps(kept))

    @staticmethod
    def key(run: Run) -> str:
        return f"{run.size}-{run.arm}-rho{float(run.rho)!r}"  # distinct rhos, distinct files

    def tensor(self, name: str, make) -> Tensor:
        """``make()``'s tensor, kept in safetensors after the first call."""
        from safetensors.torch import load_file, save_file

        path = self._path(name, ".safetensors")
        if path.exists():
            return load_file(str(path))[name]
        value = make()
        atomic_write(path, lambda tmp: save_file({name: value.detach().contiguous().cpu()}, tmp))
        return value


def _settings(cfg, rater_cfg, pool, scores, ref, val, given_pool, given_rho) -> dict:
    """What every run of an evaluation depends on: the configuration, the rater's shape (its
    FLOPs), the versions that compute the curves, and digests of the token sequences each run
    reads (so the tokenizer, the windows and the split are covered, not a file name)."""

    def seqs(x: Sequences | None):
        return () if x is None else (x.input_ids, x.loss_mask, x.doc_index)

    settings = {
        "config": asdict(cfg),
        "rater": asdict(rater_cfg),
        "versions": {"datarater": _source_digest(), "torch": torch.__version__},
        "data": {
            "pool and scores": digest(*seqs(pool), scores),
            "reference half of the target": digest(*seqs(ref)),
            "validation half of the target": digest(*seqs(val)),
            "filtered rows": None if given_pool is None else digest(*seqs(given_pool), given_rho),
        },
    }
    return json.loads(json.dumps(settings))  # as read back from settings.json


def _source_digest() -> str:
    """The version and a digest of datarater's own source: curves from other code (an upgrade,
    an edit between a crash and the rerun) are not mixed into one report."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.rglob("*.py"))
    parts = [x for p in files for x in (str(p.relative_to(root)), p)]  # name, then bytes
    return f"{__version__}+{digest(*parts)[:12]}"


def _differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two settings trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted({*old, *new}, key=str)
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    if old == new:
        return []

    def short(v):
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else v  # a digest

    return [f"{prefix[:-1]}: {short(old)} -> {short(new)}"]


def run_evaluation(
    texts: Sequence[str],
    scores: Tensor,
    val_texts: Sequence[str],
    out: Path | str,
    tokenizer,
    rater_cfg: TransformerConfig,
    cfg: EvalConfig | None = None,
    given: tuple[Sequence[str], float] | None = None,
    progress: bool = True,
    given_name: str | None = None,
) -> dict:
    """Train every arm, write ``evaluation.json``, ``evaluation.md`` and plots to ``out``.

    ``texts``/``scores``: the scored raw pool; ``val_texts``: the target corpus (split into a
    reference-LM half and a validation half); ``given``: optional extra arm, the rows an
    earlier ``datarater filter`` kept and the rho it discarded at.
    """
    from tqdm import tqdm

    cfg = cfg or EvalConfig()
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if len(texts) != len(scores):
        raise ValueError(f"need one score per text: {len(scores)} scores, {len(texts)} texts")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).sum())} scores are NaN or infinite")
    if len(val_texts) < 4:
        raise ValueError(f"the validation corpus needs at least 4 documents, got {len(val_texts)}")
    if given is not None and not (len(given[0]) and 0.0 <= given[1] < 1.0):
        raise ValueError(
            f"the filtered rows must be non-empty with a discard fraction in [0, 1) "
            f"(got {len(given[0])} rows, rho {given[1]})"
        )
    vocab = tokenizer.vocab_size
    said = _check_setup(texts, val_texts, rater_cfg, cfg, vocab)
    window = (tokenizer, cfg.seq_len, cfg.max_windows)
    pool = per_document(texts, *window)
    seq_scores = scores[pool.doc_index]
    ref_idx, val_idx = split_heldout(len(val_texts), 0.5, seed=cfg.seed)
    ref = per_document([val_texts[i] for i in ref_idx], *window)
    val = per_document([val_texts[i] for i in val_idx], *window)
    given_pool = None if given is None else per_document(given[0], *window)
    # fail now, not after hours of training: every step draws distinct candidates
    need = candidates_per_batch(cfg.batch, max(cfg.rhos))
    if len(pool) < need:
        raise ValueError(
            f"the training pool holds {len(pool)} sequences; batch {cfg.batch} at rho "
            f"{max(cfg.rhos)} needs {need} distinct candidates per step"
        )
    if given_pool is not None and len(given_pool) < cfg.batch:
        raise ValueError(f"the filtered rows give {len(given_pool)} sequences, < batch {cfg.batch}")
    out = Path(out)
    RunFolder.claim(out, "evaluate")  # one writer, and never a folder of another kind
    given_rho = None if given is None else given[1]
    settings = _settings(cfg, rater_cfg, pool, seq_scores, ref, val, given_pool, given_rho)
    finished = _Finished(out / "runs", settings)
    # the rater scores candidates of at most its own context
    scored_cfg = replace(rater_cfg, max_seq_len=min(rater_cfg.max_seq_len, cfg.seq_len))
    rater_flops = rater_flops_per_token(scored_cfg)
    small, sizes = cfg.sizes[0], list(cfg.sizes)

    runs: list[Run] = []
    for size in sizes:
        runs.append(Run(size, "unfiltered", 0.0, 0.0))
        rhos = cfg.rhos if size == small else ()  # larger sizes: filled in after the sweep
        runs += [Run(size, "datarater", r, rater_flops) for r in rhos]
    n_runs = len(runs) + (len(sizes) - 1) + (4 if cfg.baselines else 0) + (given is not None)
    bar = tqdm(total=n_runs * cfg.steps * cfg.repeats, desc="evaluate", disable=not progress)

    def skip(steps: int) -> None:  # work done before a crash: counted, not in the rate
        if bar.disable:
            return
        bar.n += steps
        bar.initial += steps
        bar.last_print_n = bar.n
        bar.refresh()

    def train(run: Run, pool_: Sequences, sc: Tensor | None, keep: str = "top") -> None:
        if finished.load(run):  # trained before a crash, by a run with these settings
            skip(cfg.steps * cfg.repeats)
            return
        bar.set_postfix(run=f"{run.size} {run.label}")
        trained = [
            train_lm(
                lm_config(run.size, vocab, cfg.seq_len),
                pool_,
                val,
                cfg.steps,
                cfg.batch,
                cfg.seed + 1000 * k,
                scores=sc,
                rho=run.rho,
                keep=keep,
                eval_every=cfg.eval_every,
                lr=cfg.lr,
                on_step=lambda: bar.update(1),
            )
            for k in range(cfg.repeats)
        ]
        curves = [t.curve for t in trained]
        run.curve = [(c[0][0], sum(x[1] for x in c) / len(c)) for c in zip(*curves)]
        run.tokens = sum(t.tokens for t in trained) / len(trained)
        finished.save(run)

    for run in runs:
        train(run, pool, None if run.arm == "unfiltered" else seq_scores)
    # (a run that diverged, with a NaN at its end, is never the best)
    sweep = [r for r in runs if r.size == small and r.arm == "datarater"]
    sweep = [r for r in sweep if math.isfinite(r.curve[-1][1])]
    best = min(sweep, key=lambda r: r.curve[-1][1]) if sweep else None
    best_rho = best.rho if best else 0.5
    if best is None and cfg.rhos:
        said.append(
            "every run of the rho sweep diverged (a non-finite final NLL): the larger sizes "
            "were trained at rho = 0.5, which is no best"
        )
        warnings.warn(said[-1], stacklevel=2)
    for size in sizes[1:]:
        run = Run(size, "datarater", best_rho, rater_flops)
        train(run, pool, seq_scores)
        runs.append(run)

    fixed: dict = {"rater_meta_training_flops": None}  # not known here; not counted
    if cfg.baselines:
        # the reference LM: the smallest size, trained on the reference half of the target data
        ref_cfg = lm_config(small, vocab, cfg.seq_len)

        def reference_nll() -> Tensor:
            bar.set_postfix(run="reference LM")
            args = (ref_cfg, ref, val, cfg.steps, cfg.batch, cfg.seed + 1)
            trained = train_lm(*args, lr=cfg.lr, on_step=bar.update)
            return sequence_nll(trained.model, pool)

        n_done = bar.n
        ppl = finished.tensor("reference_nll", reference_nll)
        bar.update(n_done + cfg.steps * cfg.repeats - bar.n)
        ref_flops = forward_flops_per_token(ref_cfg)
        fixed["reference_lm_training_flops"] = (
            cfg.steps * cfg.batch * cfg.seq_len * train_flops_per_token(ref_cfg)
        )
        for arm, keep in (("ppl-low", "bottom"), ("ppl-mid", "middle"), ("ppl-high", "top")):
            run = Run(small, arm, best_rho, ref_flops)
            train(run, pool, ppl, keep)
            runs.append(run)
    if given is not None:
        run = Run(small, "given", given[1], rater_flops)
        train(run, given_pool, None)
        runs.append(run)
    bar.close()

    for run in runs:
        base = next(r for r in runs if r.size == run.size and r.arm == "unfiltered")
        flops = train_flops_per_token(lm_config(run.size, vocab, cfg.seq_len))
        if run.arm == "unfiltered":
            n_cand = cfg.batch
        elif run.arm == "given":  # the rows were kept from 1 / (1 - rho) times as many
            n_cand = cfg.batch / (1.0 - run.rho)
        else:
            n_cand = candidates_per_batch(cfg.batch, run.rho)
        run.result = compute_gain(run, base, flops, cfg.batch, n_cand)
        run.result["trained_tokens"] = run.tokens

    report = _summarise(runs, cfg, best_rho, fixed, len(texts), len(pool), len(val))
    report["warnings"] = said
    if given is not None:
        report["given"] = given_name or "rows given by the caller"
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=1))
    _plots(out, runs, cfg)
    atomic_write_text(out / "evaluation.md", _markdown(report))
    return report


def _summarise(runs, cfg, best_rho, fixed, n_docs, n_seqs, n_val) -> dict:
    largest = next(
        (r for r in runs if r.size == cfg.sizes[-1] and r.arm == "datarater" and r.rho == best_rho),
        None,
    )
    sweep = [r for r in runs if r.arm == "datarater" and r.result["net_compute_gain"] is not None]
    top = max(sweep, key=lambda r: r.result["net_compute_gain"], default=None)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "documents": n_docs,
        "training_sequences": n_seqs,
        "validation_sequences": n_val,
        "tokens_per_run": cfg.steps * cfg.batch * cfg.seq_len,
        "best_rho": best_rho,
        # the protocol's number: the largest size at the rho chosen on the smallest
        "net_compute_gain": None if largest is None else largest.result["net_compute_gain"],
        "net_compute_gain_size": cfg.sizes[-1],
        # the best of all datarater runs: a maximum over noisy runs, so biased upwards
        "max_net_compute_gain": None if top is None else top.result["net_compute_gain"],
        "max_net_compute_gain_at": None if top is None else {"size": top.size, "rho": top.rho},
        "fixed_costs": fixed,
        "runs": [
            {"size": r.size, "arm": r.arm, "rho": r.rho, **r.result, "curve": r.curve} for r in runs
        ],
    }


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "not reached"
    return f"{100 * x:+.1f} %" if pct else f"{x:.4f}"


def _markdown(rep: dict) -> str:
    rows = "\n".join(
        f"| {r['size']} | {r['arm']} | {r['rho']:.3g} | {r['final_nll']:.4f} | "
        f"{_fmt(r['compute_fraction'])} | {_fmt(r['net_compute_gain'], True)} | "
        f"{100 * r['scoring_overhead']:.1f} % |"
        for r in rep["runs"]
    )
    top = rep["max_net_compute_gain_at"]
    most = (
        "no datarater run reached the unfiltered final NLL"
        if top is None
        else f"{_fmt(rep['max_net_compute_gain'], True)} (size {top['size']}, "
        f"rho = {top['rho']:g}; a maximum over runs, so biased upwards)"
    )
    ref = rep["fixed_costs"].get("reference_lm_training_flops")
    ref = "" if ref is None else f"; training the perplexity reference LM, {ref:.3g} FLOPs"
    warned = "".join(f"> **Warning:** {w}\n>\n" for w in rep.get("warnings", []))
    arms = {r["arm"] for r in rep["runs"]}
    legend = [
        ("unfiltered", "the first N of each step's random candidates: the baseline of its size"),
        ("datarater", "the rater's top (1 - rho) of each oversampled batch"),
        (
            "ppl-low / ppl-mid / ppl-high",
            "the lowest, middle or highest perplexity (1 - rho) "
            "of each oversampled batch, by a reference LM trained on half of the target corpus",
        ),
        ("given", f"the rows of {rep.get('given', '--filtered')}, kept at its rho"),
    ]
    legend = "".join(
        f"* **{name}**: {what}\n" for name, what in legend if set(name.split(" / ")) & arms
    )
    return f"""# datarater evaluate

{warned}
Every run trains a fresh model for {rep["tokens_per_run"]:,} token slots (curves averaged over
{rep["config"]["repeats"]} seed(s)). Best discard fraction by validation NLL on the smallest
size: **rho = {rep["best_rho"]:g}**. Net compute gain of the largest size
({rep["net_compute_gain_size"]}) at that rho: **{_fmt(rep["net_compute_gain"], True)}**.
Best of all datarater runs: {most}.

Compute fraction: the compute a run needs to reach its size's unfiltered final validation NLL,
over what the unfiltered run needed to reach it (both at their first passage; a run that ends
above that NLL has not reached it), counting the scorer's inference FLOPs on every candidate
(oversampling included). Net compute gain = 1 - compute fraction.

{legend}
| size | arm | rho | final val NLL | compute fraction | net compute gain | scoring overhead |
|---|---|---|---|---|---|---|
{rows}

Fixed costs, not in the fractions above: meta-training the rater (not counted here){ref}.
Validation NLL is per target token. Selection that favours short documents trains on fewer
real tokens per slot: `trained_tokens` in evaluation.json has each run's count.

![curves](evaluation_curves.png)
![sweep](rho_sweep.png)
"""


def _plots(out: Path, runs: list[Run], cfg: EvalConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r.size for r in runs))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for r in (r for r in runs if r.size == size):
            steps, nll = zip(*r.curve)
            ax.plot(steps, nll, label=r.label, lw=2 if r.arm == "unfiltered" else 1)
        late = [n for r in runs if r.size == size for s, n in r.curve if s >= cfg.steps // 4]
        if late:  # the first steps fall fast; the comparison lives below them
            ax.set_ylim(min(late) - 0.02, max(late) + 0.02)
        ax.set_title(f"size {size}")
        ax.set_xlabel(f"training step ({cfg.batch} x {cfg.seq_len} tokens)")
        ax.set_ylabel("validation NLL")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_png(fig, out / "evaluation_curves.png")
    plt.close(fig)

    small = sizes[0]
    sweep = sorted(
        (r for r in runs if r.size == small and r.arm == "datarater"), key=lambda r: r.rho
    )
    if not sweep:
        return
    base = next(r for r in runs if r.size == small and r.arm == "unfiltered")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([r.rho for r in sweep], [r.curve[-1][1] for r in sweep], "o-", label="datarater")
    a1.axhline(base.curve[-1][1], color="gray", ls="--", label="unfiltered")
    a1.set_xlabel("discard fraction rho")
    a1.set_ylabel("final validation NLL")
    a1.legend()
    gains = [r.result["net_compute_gain"] for r in sweep]
    a2.bar(
        [f"{r.rho:g}" for r in sweep],
        [0.0 if g is None else 100 * g for g in gains],
        color=["tab:gray" if g is None else "tab:green" if g > 0 else "tab:red" for g in gains],
    )
    for i, g in enumerate(gains):
        if g is None:
            a2.text(i, 0, "not\nreached", ha="center", va="bottom", fontsize=8)
    a2.axhline(0, color="black", lw=0.8)
    a2.set_xlabel("discard fraction rho")
    a2.set_ylabel("net compute gain (%)")
    fig.suptitle(f"rho sweep, size {small}")
    fig.tight_layout()
    atomic_save_png(fig, out / "rho_sweep.png")
    plt.close(fig)
