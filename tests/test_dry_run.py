"""``datarater train --dry-run``: its estimate against a measured meta-step, its verdict and
advice, and the shipped paper configuration."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from datarater.cli import main
from datarater.data.tokens import Sequences
from datarater.profiling import peak_tensor_bytes
from datarater.training import TrainConfig, Trainer
from datarater.training import dry_run as D


def _config(micro: int, remat, layers: int = 3) -> TrainConfig:
    return TrainConfig(population=1, inner_steps=2, inner_batch=8, outer_batch=8,
                       micro_batch_size=micro, remat=remat, steps=1, checkpoint_every=100,
                       lm=dict(d_model=64, n_layers=layers, n_heads=2),
                       rater=dict(d_model=32, n_layers=1, n_heads=2))  # fmt: skip


def _measured_peak(cfg: TrainConfig, seq_len: int) -> int:
    """A trainer built and one meta-step taken, from nothing: what the estimate describes."""
    g = torch.Generator().manual_seed(0)

    def seqs(n):
        return Sequences(torch.randint(0, 256, (n, seq_len), generator=g), torch.ones(n, seq_len),
                         torch.arange(n))  # fmt: skip

    train, held = seqs(32), seqs(16)
    with tempfile.TemporaryDirectory() as out:

        def run():
            Trainer(cfg, train, held, 258, out, 257).meta_update()

        run()
        return peak_tensor_bytes(run)[0]


@pytest.mark.parametrize("micro,remat,seq_len", [(4, None, 256), (8, "block", 256)])
def test_the_estimate_is_near_the_measured_peak(micro, remat, seq_len):
    cfg = _config(micro, remat)
    est = D.estimate(cfg, 258, seq_len, "cpu")
    measured = _measured_peak(cfg, seq_len)
    assert 0.75 <= est.peak_bytes / measured <= 1.25, (est.peak_bytes, measured)
    assert est.micro_batches == 3 * (8 // micro)  # T = 2 inner batches and the outer one
    assert est.step_seconds > 0


def test_a_config_that_cannot_fit_is_named_with_what_to_change(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(D, "capacity", lambda device: 10_000_000)  # a 10 MB device
    config = tmp_path / "big.json"
    config.write_text(json.dumps({"population": 1, "inner_batch": 8, "outer_batch": 8,
                                  "micro_batch_size": 8, "remat": None, "precision": "fp32",
                                  "lm": {"d_model": 64, "n_layers": 3, "n_heads": 2}}))  # fmt: skip
    code = main(["train", "--dry-run", "--config", str(config), "--seq-len", "256"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "does NOT fit" in printed
    for change in ("remat to 'block'", "precision to 'bf16'", "lower micro_batch_size (now 8)"):
        assert change in printed
    small = {"d_model": 16, "n_layers": 1, "n_heads": 2}
    config.write_text(json.dumps({"population": 1, "inner_batch": 4, "outer_batch": 4,
                                  "lm": small, "rater": small}))  # fmt: skip
    monkeypatch.setattr(D, "capacity", lambda device: None)
    assert main(["train", "--dry-run", "--config", str(config), "--seq-len", "32"]) == 0
    assert "fits" in capsys.readouterr().out


def test_the_paper_configuration_ships_and_takes_the_presets():
    from datarater.models import PRESETS
    from datarater.training.trainer import CONFIGS

    cfg = TrainConfig.from_dict(json.loads((CONFIGS / "paper.json").read_text()))
    assert (cfg.population, cfg.inner_steps, cfg.inner_batch, cfg.meta_clip) == (8, 2, 128, 0.01)
    assert (cfg.meta_weight_decay, cfg.meta_warmup, cfg.precision) == (0.1, 100, "bf16")
    assert cfg.lm["d_model"] == PRESETS["435m"].d_model and "vocab_size" not in cfg.lm
    assert cfg.rater["n_layers"] == PRESETS["50m"].n_layers
    lm = PRESETS["435m"]
    per_gpu = D.fixed_bytes(cfg, lm, PRESETS["50m"], 8, torch.device("cuda"))
    assert 20e9 < per_gpu < 40e9  # 435M float32 vectors: states, tape, adjoints (one per GPU)
