"""Scoring throughput on the CPU: tokens per second of score_texts with a small rater."""

from __future__ import annotations

import torch

from datarater.models import Rater, TransformerConfig
from datarater.scoring.score import score_texts


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
