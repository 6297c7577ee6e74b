"""The quick demo: the rater learns which documents are corrupted, and filtering helps."""

from __future__ import annotations

import json
import random

from datarater.demo import KINDS, builtin_documents, corrupt
from datarater.scoring.metrics import auc, spearman


def test_quick_demo_learns_the_right_directions(quick_demo):
    tmp_path = quick_demo.out
    assert quick_demo.code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["auc"] > 0.75
    assert report["spearman_noise_level_vs_score"] < 0
    assert report["heldout_loss_filtered"] < report["heldout_loss_unfiltered"]
    assert set(report["auc_by_corruption"]) == set(KINDS)
    for name in (
        "report.md",
        "scores_by_corruption.png",
        "training_curves.png",
        "rater/rater.safetensors",
        "rater/config.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert '"auc"' in quick_demo.printed


def test_corpus_and_corruptions():
    docs = builtin_documents()
    assert len(docs) > 1000 and all(200 <= len(d) <= 600 for d in docs)
    rng = random.Random(0)
    text = docs[0]
    for kind in KINDS:
        assert corrupt(text, kind, rng) != text, kind


def test_metrics():
    import torch

    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) > 0.999
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) < -0.999
