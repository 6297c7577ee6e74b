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


def test_an_interrupted_demo_resumes_and_reports_what_an_uninterrupted_one_does(
    quick_demo, tmp_path, monkeypatch
):
    """Killed after 30 of its 60 meta-steps (checkpoints every 20), the quick demo run again
    continues from step 20 and ends with the uninterrupted demo's report; a demo with other
    settings in the folder is replaced, not resumed."""
    import pytest

    from datarater.demo import run_demo
    from datarater.training import Trainer

    real, started = Trainer.run, []

    def killed(self, progress=True, stop_after=None):
        real(self, progress, stop_after=30)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Trainer, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, quick=True, progress=False)

    def counted(self, progress=True, stop_after=None):
        started.append(self.step)
        return real(self, progress, stop_after)

    monkeypatch.setattr(Trainer, "run", counted)
    got = run_demo(tmp_path, quick=True, progress=False)
    assert started == [20]
    want = json.loads((quick_demo.out / "report.json").read_text())
    for report in (got, want):
        report.pop("seconds")
    assert got == want
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 61))  # no step logged twice
    started.clear()
    run_demo(tmp_path, quick=True, seed=1, progress=False)  # other settings: from scratch
    assert started == [0]
    (tmp_path / "checkpoints" / "LATEST").write_text("step-000999")  # names nothing
    started.clear()
    run_demo(tmp_path, quick=True, seed=1, progress=False)  # unreadable: from scratch too
    assert started == [0]
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step-000060"
    # a folder holding a run that is not a demo's is refused, not wiped, --fresh or not
    from datarater.runs import RunFolder

    train_run = tmp_path / "train_run"
    RunFolder.claim(train_run, "train").release()
    (train_run / "checkpoints").mkdir()
    for fresh in (False, True):
        with pytest.raises(ValueError, match="holds a training run, not a demo"):
            run_demo(train_run, quick=True, progress=False, fresh=fresh)
    assert (train_run / "checkpoints").is_dir()
