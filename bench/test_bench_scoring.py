"""Scoring throughput on the CPU: tokens per second of score_texts with a small rater."""

from __future__ import annotations

import time

import torch

from datarater.models import Rater, TransformerConfig
from datarater.scoring.score import score_texts


def _timed(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[rounds // 2]


def test_rater_forward_fused_vs_explicit_attention(benchmark, record, summarize):
    """Inference mode lets the attention run fused (SDPA); with autograd on, it is written out
    (forward-mode AD needs that). Same rater, same batch, one run."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=512, d_model=128, n_layers=2, n_heads=4)
    rater = Rater(cfg, pad_id=257).eval()
    ids = torch.randint(0, 256, (32, 512))

    def fused():
        with torch.inference_mode():
            rater(ids)

    def explicit():
        with torch.no_grad():
            rater(ids)

    benchmark.pedantic(fused, rounds=5, warmup_rounds=1)
    t_fused, t_explicit = benchmark.stats.stats.median, _timed(explicit)
    tokens = ids.numel()
    record(
        "scoring",
        case="rater forward 32x512",
        fused_tokens_per_s=tokens / t_fused,
        explicit_tokens_per_s=tokens / t_explicit,
        speedup=t_explicit / t_fused,
    )
    summarize("scoring", f"fused attention {t_explicit / t_fused:.2f}x explicit (same run)")


def test_score_texts_throughput(benchmark, record):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=512, d_model=128, n_layers=2, n_heads=4)
    rater = Rater(cfg, pad_id=257)
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    texts = [text[i : i + 400 + (i % 700)] for i in range(0, 400 * 256, 400)]
    tokens = sum(min(len(t.encode()) + 1, 512) for t in texts)
    benchmark.pedantic(lambda: score_texts(rater, texts, batch_size=64), rounds=3, warmup_rounds=1)
    record(
        "scoring",
        rater_params=sum(p.numel() for p in rater.parameters()),
        docs=len(texts),
        tokens=tokens,
        tokens_per_s=tokens / benchmark.stats.stats.median,
    )
