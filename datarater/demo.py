"""The demo: meta-train a rater on a corpus with known good and bad documents, and check that
it learned something true.

The corpus is built at run time from text every Python installation ships (the reference
topics of ``pydoc_data`` and standard-library docstrings); a share of it is corrupted the ways
web text is (character noise at three rates, shuffled words, mojibake, all capitals, whitespace
floods, non-printable characters, random tokens). A rater is meta-trained with clean held-out
text as the outer target; then it scores held-out documents, and two fresh language models are
trained for the same number of steps, one on the raw pool and one on the rater's batch-level
top-K selection, and compared on clean held-out text.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import ByteTokenizer, Sequences, per_document
from .evaluation.lm import train_lm
from .io import atomic_save_png, atomic_write_text
from .models import TransformerConfig
from .runs import RunFolder
from .scoring.metrics import auc, spearman
from .scoring.score import score_texts
from .training import TrainConfig, Trainer

CLEAN = "clean"
KINDS = (
    "char_noise_0.05",
    "char_noise_0.15",
    "char_noise_0.35",
    "shuffled_words",
    "mojibake",
    "all_caps",
    "whitespace_flood",
    "non_printable",
    "random_tokens",
)
NOISE_LEVEL = {
    CLEAN: 0.0,
    "char_noise_0.05": 0.05,
    "char_noise_0.15": 0.15,
    "char_noise_0.35": 0.35,
}


# ---------------------------------------------------------------------------------------------
# corpus


def builtin_documents(min_chars: int = 200, max_chars: int = 600) -> list[str]:
    """Paragraph-sized documents from pydoc_data topics and standard-library docstrings."""
    import importlib
    import pydoc_data.topics as topics

    texts = list(topics.topics.values())
    for name in (
        "os",
        "re",
        "json",
        "collections",
        "itertools",
        "functools",
        "pathlib",
        "typing",
        "string",
        "textwrap",
        "statistics",
        "random",
        "datetime",
        "argparse",
        "logging",
        "subprocess",
        "shutil",
        "inspect",
        "dataclasses",
        "enum",
        "heapq",
        "bisect",
        "contextlib",
        "csv",
        "fractions",
        "decimal",
        "difflib",
        "email",
        "html",
        "http.client",
        "urllib.parse",
        "zipfile",
        "tarfile",
        "sqlite3",
        "threading",
    ):
        try:
            with warnings.catch_warnings():  # deprecated submodules (typing.io, ...) warn
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except ImportError:
            continue
        # the module and what it defines itself (not what it happens to have imported, which
        # depends on the process's import history), in a fixed order
        own = [
            v
            for k, v in sorted(vars(mod).items())
            if callable(v) and getattr(v, "__module__", None) == mod.__name__
        ]
        for obj in [mod, *own]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    docs, seen = [], set()
    for text in texts:
        chunk = ""
        for para in text.split("\n\n"):
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= min_chars:
                piece = chunk[:max_chars]
                if piece not in seen:
                    seen.add(piece)
                    docs.append(piece)
                chunk = ""
    return docs


_MOJIBAKE = {"e": "Ã©", "a": "Ã¤", "o": "Ã¶", "'": "â€™", '"': "â€œ", "-": "â€“", "u": "Ã¼"}


def corrupt(text: str, kind: str, rng: random.Random) -> str:
    """One graded corruption of the kinds that web text suffers."""
    if kind.startswith("char_noise_"):
        rate = float(kind.rsplit("_", 1)[1])
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#@$%&*~^|"
        return "".join(rng.choice(alphabet) if rng.random() < rate else c for c in text)
    if kind == "shuffled_words":
        # word order scrambled across the document, layout (the whitespace between words) kept,
        # so that this corruption changes word order and nothing else
        parts = re.split(r"(\s+)", text)
        slots = [i for i in range(0, len(parts), 2) if parts[i]]
        words = [parts[i] for i in slots]
        rng.shuffle(words)
        for i, w in zip(slots, words):
            parts[i] = w
        return "".join(parts)
    if kind == "mojibake":
        return "".join(_MOJIBAKE.get(c, c) if rng.random() < 0.6 else c for c in text)
    if kind == "all_caps":
        return text.upper()
    if kind == "whitespace_flood":
        return "".join(c + rng.choice([" " * 8, "\n\n\n", "\t\t\t", ""]) for c in text.split(" "))
    if kind == "non_printable":
        return "".join(c + (chr(rng.randrange(0, 32)) if rng.random() < 0.3 else "") for c in text)
    if kind == "random_tokens":
        vocab = ["qx", "zzv", "##", "lorem", "0x3f", "kkk", "&nbsp;", "@@@", "vbn", "%%"]
        return " ".join(rng.choice(vocab) for _ in range(max(8, len(text) // 5)))
    raise ValueError(f"unknown corruption {kind!r}")


@dataclass
class DemoCorpus:
    pool: list[str]  # the training pool (clean and corrupted)
    pool_kind: list[str]
    heldout_clean: list[str]  # the outer target and the final evaluation text
    eval_docs: list[str]  # held-out documents, clean and corrupted, for scoring metrics
    eval_kind: list[str]


def build_corpus(seed: int = 0, corrupt_fraction: float = 0.5, max_docs: int | None = None):
    rng = random.Random(seed)
    docs = builtin_documents()
    rng.shuffle(docs)
    if max_docs:
        docs = docs[:max_docs]
    n_eval = max(40, len(docs) // 6)
    n_held = max(40, len(docs) // 6)
    eval_src, held, train = docs[:n_eval], docs[n_eval : n_eval + n_held], docs[n_eval + n_held :]
    pool, pool_kind = [], []
    for i, d in enumerate(train):
        kind = KINDS[i % len(KINDS)] if rng.random() < corrupt_fraction else CLEAN
        pool.append(d if kind == CLEAN else corrupt(d, kind, rng))
        pool_kind.append(kind)
    eval_docs, eval_kind = [], []
    for i, d in enumerate(eval_src):
        kind = CLEAN if i % 2 == 0 else KINDS[(i // 2) % len(KINDS)]
        eval_docs.append(d if kind == CLEAN else corrupt(d, kind, rng))
        eval_kind.append(kind)
    return DemoCorpus(pool, pool_kind, held, eval_docs, eval_kind)


# ---------------------------------------------------------------------------------------------
# scoring


def score_sequences(rater, seqs: Sequences, batch: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        ids = seqs.input_ids
        scores = torch.cat([rater(ids[i : i + batch]) for i in range(0, len(seqs), batch)])
    return scores.clone()


# ---------------------------------------------------------------------------------------------
# the whole demo


def run_demo(
    out: Path | str,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    fresh: bool = False,
    precision: str = "auto",
) -> dict:
    """Meta-train a rater on the built-in corpus and report what it learned, in ``out``.
    An interrupted demo run again with the same settings resumes from its last checkpoint
    (``fresh``: start over); a demo with other settings in ``out`` is replaced.
    ``precision``: the inner models' compute (TrainConfig.precision)."""
    t0 = time.time()
    out = Path(out)
    RunFolder.claim(out, "demo")  # its training run is written into it too
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    seq_len = 64
    corpus = build_corpus(seed, max_docs=900 if quick else None)
    pool = per_document(corpus.pool, tok, seq_len)
    held = per_document(corpus.heldout_clean, tok, seq_len)
    evals = per_document(corpus.eval_docs, tok, seq_len)
    small = (
        dict(d_model=32, n_layers=1, n_heads=2)
        if quick
        else dict(d_model=48, n_layers=2, n_heads=2)
    )
    # Between meta-steps the inner models take 4 plain rater-weighted steps, so the population
    # reaches later training, where subtler corruptions start to cost; the meta learning rate
    # decays (cosine) so that the final rater settles.
    cfg = TrainConfig(
        steps=60 if quick else 600,
        population=2,
        inner_steps=2,
        steps_between=0 if quick else 4,
        inner_batch=16,
        outer_batch=16,
        lifetime=30 if quick else 150,
        inner_lr=3e-3,
        meta_lr=3e-3,
        meta_warmup=10 if quick else 40,
        meta_decay="constant" if quick else "cosine",
        meta_clip=1.0,
        checkpoint_every=20 if quick else 100,
        seed=seed,
        lm=small,
        rater=small,
        precision=precision,
    )
    marker = out / "demo.json"  # (a folder of another kind was refused by its claim)
    atomic_write_text(marker, json.dumps({"quick": quick, "seed": seed}))
    trainer, resumed = Trainer(cfg, pool, held, tok.vocab_size, out, tok.pad_id), False
    if not fresh:
        try:
            resumed = trainer.resume()
        except Exception as e:  # noqa: BLE001 - other settings, or an unreadable checkpoint
            if progress:
                print(f"not resuming the demo in {out} ({type(e).__name__}: {e}); starting over")
            trainer = Trainer(cfg, pool, held, tok.vocab_size, out, tok.pad_id)
    if resumed and progress:
        print(f"resuming the demo in {out} at meta-step {trainer.step} (--fresh starts over)")
    if not resumed:
        trainer.start_over()
        for name in ("report.json", "report.md", "scores_by_corruption.png", "training_curves.png"):
            (out / name).unlink(missing_ok=True)
    rater = trainer.run(progress=progress)

    # Scores of held-out documents, by corruption kind. A document's score is the
    # token-weighted mean over its windows, as `datarater score --aggregate token_weighted`
    # gives it; the score of the first window alone is reported beside it.
    s = score_texts(rater, corpus.eval_docs, tok, seq_len, aggregate="token_weighted")
    kind = corpus.eval_kind
    is_clean = torch.tensor([k == CLEAN for k in kind])
    first = score_sequences(rater, evals)
    first_clean = torch.tensor([corpus.eval_kind[i] == CLEAN for i in evals.doc_index.tolist()])
    report = {
        "auc": auc(s[is_clean], s[~is_clean]),
        "auc_first_window": auc(first[first_clean], first[~first_clean]),
    }
    report["auc_by_corruption"] = {
        k: auc(s[is_clean], s[torch.tensor([x == k for x in kind])]) for k in KINDS if k in kind
    }
    lvl_mask = torch.tensor([x in NOISE_LEVEL for x in kind])
    levels = torch.tensor([NOISE_LEVEL.get(x, 0.0) for x in kind])[lvl_mask]
    report["spearman_noise_level_vs_score"] = spearman(levels, s[lvl_mask])

    # downstream: raw pool vs the rater's top-K selection, judged on the clean held-out
    # documents the rater never saw (not its outer data: judging a rater on the data it was
    # meta-trained for flatters it)
    pool_scores = score_sequences(rater, pool)
    target = per_document([d for d, k in zip(corpus.eval_docs, kind) if k == CLEAN], tok, seq_len)
    lm_cfg = TransformerConfig(vocab_size=tok.vocab_size, max_seq_len=seq_len, **small)
    steps = 150 if quick else 400
    raw = train_lm(lm_cfg, pool, target, steps, 16, seed + 7).curve
    filtered = train_lm(lm_cfg, pool, target, steps, 16, seed + 7, scores=pool_scores,
                        rho=0.5).curve  # fmt: skip
    report["heldout_loss_unfiltered"] = raw[-1][1]
    report["heldout_loss_filtered"] = filtered[-1][1]
    kept_kinds = _kept_share(pool_scores, pool, corpus.pool_kind)
    report["kept_share_clean_top_half"] = kept_kinds
    report["meta_steps"] = cfg.steps
    report["seq_len"] = seq_len
    report["seconds"] = time.time() - t0
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    _plots(out, s, kind, trainer.history, raw, filtered)
    _markdown(out, report)
    return report


def _kept_share(scores, pool: Sequences, kinds: list[str]) -> float:
    """Share of clean sequences among the top half by score (about 0.5 for a blind rater)."""
    top = scores.topk(len(scores) // 2).indices
    return float(sum(kinds[pool.doc_index[i]] == CLEAN for i in top.tolist()) / len(top))


def _plots(out: Path, scores, kind, history, raw, filtered) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per corruption, each over the clean documents' scores
    clean = scores[[i for i, x in enumerate(kind) if x == CLEAN]].numpy()
    lo, hi = float(scores.min()), float(scores.max())
    fig, axes = plt.subplots(3, 3, figsize=(11, 8), sharex=True)
    for ax, k in zip(axes.flat, KINDS):
        sel = [i for i, x in enumerate(kind) if x == k]
        ax.hist(clean, bins=25, range=(lo, hi), alpha=0.5, color="tab:blue", density=True)
        ax.hist(
            scores[sel].numpy(),
            bins=25,
            range=(lo, hi),
            alpha=0.6,
            color="tab:red",
            density=True,
            label=k,
        )
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(["clean", "corrupted"], fontsize=7)
    fig.supxlabel("rater score")
    fig.suptitle("Held-out document scores: clean (blue) vs each corruption (red)")
    fig.tight_layout()
    atomic_save_png(fig, out / "scores_by_corruption.png")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([h["step"] for h in history], [h["outer_loss"] for h in history])
    a1.set_xlabel("meta-step")
    a1.set_ylabel("outer loss (held-out)")
    a1.set_title("Meta-training")
    a2.plot(*zip(*raw), label="unfiltered")
    a2.plot(*zip(*filtered), label="rater top-K (rho = 0.5)")
    a2.set_xlabel("training step")
    a2.set_ylabel("held-out loss, clean text")
    a2.set_title("Fresh LMs, same steps")
    a2.legend()
    fig.tight_layout()
    atomic_save_png(fig, out / "training_curves.png", dpi=110)
    plt.close(fig)


def _markdown(out: Path, r: dict) -> None:
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["auc_by_corruption"].items())
    text = f"""# datarater demo

Meta-trained for {r["meta_steps"]} meta-steps in {r["seconds"]:.0f} s.

* AUC, clean vs corrupted held-out documents: **{r["auc"]:.3f}** (a document's score is
  the token-weighted mean of its {r["seq_len"]}-token windows; first window alone:
  {r["auc_first_window"]:.3f})
* Spearman correlation of character-noise level with score:
  **{r["spearman_noise_level_vs_score"]:.3f}** (negative: noisier text scores lower)
* Held-out loss on clean text after the same number of steps: unfiltered
  **{r["heldout_loss_unfiltered"]:.3f}**, rater top-K filtered
  **{r["heldout_loss_filtered"]:.3f}**

| corruption | AUC vs clean |
|---|---|
{rows}

![scores](scores_by_corruption.png)
![curves](training_curves.png)
"""
    atomic_write_text(out / "report.md", text)
