"""datarater evaluate: compute accounting, selection rules, and score -> filter -> evaluate ->
analyze on the built-in demo corpus."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datarater.cli import main
from datarater.data import ByteTokenizer, per_document, split_heldout
from datarater.demo import CLEAN, build_corpus
from datarater.evaluation import (
    EvalConfig,
    compute_gain,
    forward_flops_per_token,
    pick,
    rater_flops_per_token,
    run_evaluation,
    steps_to_reach,
    train_flops_per_token,
    train_lm,
)
from datarater.evaluation.evaluate import Run, lm_config
from datarater.evaluation.lm import candidates_per_batch
from datarater.models import CausalLM, TransformerConfig
from datarater.scoring.score import SCORE_COLUMN


def _run_with(curve, arm="datarater"):
    run = Run("toy", arm, 0.5, 0.0)
    run.curve = curve
    return run


def test_the_compute_fraction_reads_both_curves_alike():
    """A dip before the end is no gain: the baseline is charged only to its own first
    passage too; a run that ends above the target has not reached it."""
    base = _run_with([(0, 4.0), (10, 3.0), (20, 2.4), (30, 2.5)], "unfiltered")
    same = _run_with(list(base.curve))
    got = compute_gain(same, base, train_flops=1.0, batch=1, scorer_candidates=1)
    assert got["compute_fraction"] == pytest.approx(1.0)
    worse = _run_with([(0, 4.0), (10, 2.45), (20, 2.6), (30, 2.6)])  # touched, ended above
    assert compute_gain(worse, base, 1.0, 1, 1)["net_compute_gain"] is None
    better = _run_with([(0, 4.0), (10, 2.5), (20, 2.3), (30, 2.2)])
    assert compute_gain(better, base, 1.0, 1, 1)["compute_fraction"] < 1.0


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5)]
    assert steps_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 3.0) == pytest.approx(10.0)
    assert steps_to_reach(curve, 6.0) == 0.0
    assert steps_to_reach(curve, 1.0) is None


def test_compute_gain_counts_scoring_and_oversampling():
    base = Run("s", "unfiltered", 0.0, 0.0, curve=[(0, 4.0), (100, 2.0)])
    # reaches 2.0 at step 50; scorer costs 10 FLOPs per candidate token, 32 candidates per 16
    run = Run("s", "datarater", 0.5, 10.0, curve=[(0, 4.0), (50, 2.0), (100, 1.0)])
    assert compute_gain(base, base, 100.0, 16, 16)["compute_fraction"] == 1.0
    g = compute_gain(run, base, train_flops=100.0, batch=16, scorer_candidates=32)
    assert g["steps_to_target"] == pytest.approx(50.0)
    assert g["scoring_overhead"] == pytest.approx(0.2)  # 10 * 2 / 100
    assert g["compute_fraction"] == pytest.approx(50 * 120 / (100 * 100))
    assert g["net_compute_gain"] == pytest.approx(0.4)
    assert g["gross_gain"] == pytest.approx(0.5)
    never = Run("s", "datarater", 0.5, 10.0, curve=[(0, 4.0), (100, 2.5)])
    assert compute_gain(never, base, 100.0, 16, 32)["net_compute_gain"] is None


@pytest.mark.parametrize("tied", [False, True])
def test_flop_estimate_matches_what_the_models_execute(tied):
    """Against PyTorch's own FLOP counter (matmuls), per token at full context."""
    from torch.utils.flop_counter import FlopCounterMode

    from datarater.models import Rater

    cfg = TransformerConfig(
        vocab_size=61, max_seq_len=12, d_model=16, n_layers=3, n_heads=2, tie_embeddings=tied
    )
    ids = torch.randint(0, 61, (2, 12))
    for model, expected in (
        (CausalLM(cfg), forward_flops_per_token(cfg)),
        (Rater(cfg), rater_flops_per_token(cfg)),
    ):
        with FlopCounterMode(display=False) as counter:
            model(ids)
        assert counter.get_total_flops() / ids.numel() == pytest.approx(expected), type(model)
    assert train_flops_per_token(cfg) == pytest.approx(3 * forward_flops_per_token(cfg))


def test_selection_rules():
    s = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    assert sorted(pick(s, 2, "top").tolist()) == [4, 5]
    assert sorted(pick(s, 2, "bottom").tolist()) == [1, 3]  # ties: both ones
    assert sorted(s[pick(s, 3, "middle")].tolist()) == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="keep"):
        pick(s, 2, "best")
    assert candidates_per_batch(16, 0.5) == 32
    assert candidates_per_batch(16, 0.9) == 160
    assert candidates_per_batch(16, 0.25) == math.ceil(16 / 0.75)
    with pytest.raises(ValueError, match="rho"):
        candidates_per_batch(16, 1.0)
    with pytest.raises(ValueError, match="rho"):
        EvalConfig(rhos=(0.5, 1.2))
    with pytest.raises(ValueError, match="size"):
        EvalConfig(sizes=())


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_score_filter_evaluate_analyze_on_the_demo_corpus(quick_demo, tmp_path, capsys):
    """The pipeline on the quick demo's corpus and rater: a positive net compute gain at some
    rho, and corrupted documents among the lowest-scored."""
    corpus = build_corpus(0, max_docs=900)  # the quick demo's corpus
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": t, "kind": k} for t, k in zip(corpus.pool, corpus.pool_kind)]
    for i in range(4):
        _write_jsonl(data / f"shard{i}.jsonl", rows[i::4])
    # the target: clean documents the rater never saw, not even as its outer (meta) data
    target = [t for t, k in zip(corpus.eval_docs, corpus.eval_kind) if k == CLEAN]
    assert not set(target) & set(corpus.heldout_clean)
    _write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in target])
    rater = str(quick_demo.out / "rater")
    scored, kept, ev, ana = (str(tmp_path / n) for n in ("scored", "kept", "eval", "analysis"))

    assert main(["score", "--rater", rater, "--data", str(data), "--out", scored, "--quiet"]) == 0
    assert main(["filter", "--scored", scored, "--out", kept, "--rho", "0.5",
                 "--source-column", "kind"]) == 0  # fmt: skip
    stats = json.loads((tmp_path / "kept" / "stats.json").read_text())
    by_kind = stats["kept_fraction_by_source"]
    assert by_kind[CLEAN] > stats["kept_fraction"]  # clean text survives more than average

    args = ["evaluate", "--scored", scored, "--rater", rater, "--filtered", kept,
            "--heldout", str(tmp_path / "heldout.jsonl"), "--out", ev, "--steps", "300",
            "--sizes", "toy,tiny", "--quiet"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    runs = report["runs"]
    assert {r["size"] for r in runs} == {"toy", "tiny"}
    assert {r["rho"] for r in runs if r["arm"] == "datarater" and r["size"] == "toy"} == {
        0.1, 0.25, 0.5, 0.75, 0.9
    }  # fmt: skip
    assert {"ppl-low", "ppl-mid", "ppl-high", "given"} <= {r["arm"] for r in runs}
    assert report["max_net_compute_gain"] is not None and report["max_net_compute_gain"] > 0
    # and the protocol's own number: the larger size at the rho the sweep chose
    assert report["net_compute_gain"] is not None and report["net_compute_gain"] > 0
    best = min(
        (r for r in runs if r["arm"] == "datarater" and r["size"] == "toy"),
        key=lambda r: r["final_nll"],
    )
    assert report["best_rho"] == best["rho"]
    for r in runs:  # every run trained on the same number of steps and evaluated at the end
        assert r["curve"][-1][0] == 300 and math.isfinite(r["final_nll"])
    for name in ("evaluation.md", "evaluation_curves.png", "rho_sweep.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert (
        f"the rows of {kept}, kept at its rho" in (tmp_path / "eval" / "evaluation.md").read_text()
    )
    assert main([*args, "--eval-every", "0"]) == 2  # refused, not replaced by the default
    capsys.readouterr()
    assert main([*args, "--steps", "200"]) == 2  # into a folder holding another evaluation
    assert "other settings or data (config.eval_every: 25 -> 20; config.steps: 300 -> 200)" in (
        capsys.readouterr().err
    )
    assert main(args) == 0  # the same command again: every run read back, the same report
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text()) == report

    assert main(["analyze", "--scored", scored, "--out", ana, "--source-column", "kind"]) == 0
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    lowest = [row["source"] for row in analysis["lowest"]]
    assert sum(k != CLEAN for k in lowest) >= 8, lowest
    assert analysis["mean_score_by_source"][CLEAN] > min(analysis["mean_score_by_source"].values())


def _small_pool():
    """40 short documents with scores, a validation third of them, the byte tokenizer and a
    rater config: an evaluation small enough to train in seconds."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [" ".join(words[(i * k) % 10] for k in range(12)) for i in range(40)]
    scores = torch.linspace(-1, 1, len(texts))
    rater_cfg = TransformerConfig(vocab_size=258, max_seq_len=32, d_model=8, n_layers=1, n_heads=2)
    return texts, texts[::3], scores, ByteTokenizer(), rater_cfg


def test_repeats_average_the_curves_of_several_seeds(tmp_path):
    texts, val, scores, tok, rater_cfg = _small_pool()
    cfg = EvalConfig(sizes=("toy",), rhos=(0.5,), steps=6, batch=4, seq_len=32, eval_every=3,
                     repeats=2, baselines=False)  # fmt: skip
    with pytest.warns(UserWarning, match="14 of 14 validation documents also occur in the"):
        rep = run_evaluation(texts, scores, val, tmp_path, tok, rater_cfg, cfg, progress=False)
    unfiltered = next(r for r in rep["runs"] if r["arm"] == "unfiltered")
    # what was warned is in the report, for whoever reads it later; the arms are explained
    assert any("14 of 14 validation documents" in w for w in rep["warnings"])
    assert any("each curve has 3 points" in w for w in rep["warnings"])
    page = (tmp_path / "evaluation.md").read_text()
    assert "> **Warning:** 14 of 14 validation documents" in page
    assert "* **datarater**: the rater's top" in page and "ppl-low" not in page
    with pytest.raises(ValueError, match=r"smallest to largest .*small .*, toy"):
        run_evaluation(texts, scores, val, tmp_path / "y", tok, rater_cfg,
                       replace(cfg, sizes=("small", "toy")), progress=False)  # fmt: skip
    # the same split and pool the evaluation builds, trained by hand with both seeds
    _, val_idx = split_heldout(len(val), 0.5, seed=0)
    val_seqs = per_document([val[i] for i in val_idx], tok, 32, 4)
    pool = per_document(texts, tok, 32, 4)
    curves = [
        train_lm(lm_config("toy", 258, 32), pool, val_seqs, 6, 4, seed, eval_every=3)[1]
        for seed in (0, 1000)
    ]
    expected = [(a[0], (a[1] + b[1]) / 2) for a, b in zip(*curves)]
    assert [s for s, _ in unfiltered["curve"]] == [0, 3, 6]
    for (s, got), (_, want) in zip(unfiltered["curve"], expected):
        assert got == pytest.approx(want, rel=1e-6), s
    assert curves[0][-1][1] != curves[1][-1][1]  # the seeds do differ
    # how the scorer's cost is wired in: rater FLOPs on ceil(N / (1 - rho)) candidates per N
    filtered = next(r for r in rep["runs"] if r["arm"] == "datarater")
    cand = math.ceil(4 / 0.5)
    scored = replace(rater_cfg, max_seq_len=32)
    lm_flops = train_flops_per_token(lm_config("toy", 258, 32))
    want = rater_flops_per_token(scored) * cand / 4 / lm_flops
    assert filtered["scoring_overhead"] == pytest.approx(want)
    assert unfiltered["scoring_overhead"] == 0.0
    assert filtered["trained_tokens"] > 0 and unfiltered["trained_tokens"] > 0
    with pytest.raises(ValueError, match="at least one rho"):
        EvalConfig(rhos=())
    big = replace(cfg, rhos=(0.9,), batch=len(pool) // 5 + 1)  # 10 x batch > pool candidates
    big_rater = replace(rater_cfg, d_model=256)  # and a rater that costs more than the LM
    with (
        pytest.warns(UserWarning, match="LM size 'toy' costs .* scoring eats any gain"),
        pytest.raises(ValueError, match="distinct candidates per step"),
    ):
        run_evaluation(texts, scores, val, tmp_path / "x", tok, big_rater, big, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:.*shorter than seq_len")
def test_arms_share_their_candidates():
    """Step s draws the same candidates in every arm: with equal scores, top-K keeps the first
    N of them, which is exactly the unfiltered batch, so the two runs are identical."""
    tok = ByteTokenizer()
    words = "one two three four five six seven eight nine ten".split()
    texts = [" ".join(words[(i + k) % 10] for k in range(i % 7 + 3)) for i in range(30)]
    pool, val = per_document(texts, tok, 16), per_document(texts[:5], tok, 16)
    cfg = lm_config("toy", 258, 16)
    plain = train_lm(cfg, pool, val, 5, 4, seed=3, eval_every=5)
    same = train_lm(cfg, pool, val, 5, 4, seed=3, scores=torch.zeros(len(pool)), rho=0.5,
                    eval_every=5)  # fmt: skip
    assert plain.curve == same.curve and plain.tokens == same.tokens
    chosen = train_lm(cfg, pool, val, 5, 4, seed=3, scores=torch.arange(len(pool)).float(),
                      rho=0.5, eval_every=5)  # fmt: skip
    assert chosen.curve != plain.curve
    with pytest.raises(ValueError, match="distinct candidates"):
        train_lm(cfg, pool, val, 1, 4, seed=0, scores=torch.zeros(len(pool)), rho=0.9)
    with pytest.raises(ValueError, match="repeats"):
        EvalConfig(repeats=0)


def test_evaluate_names_bad_inputs(tmp_path, capsys):
    from datarater.models import Rater
    from datarater.training import save_rater

    cfg = TransformerConfig(vocab_size=258, max_seq_len=32, d_model=8, n_layers=1, n_heads=2)
    save_rater(Rater(cfg, pad_id=257), tmp_path / "rater")
    held = tmp_path / "held.jsonl"
    _write_jsonl(held, [{"text": f"held-out document {i}"} for i in range(8)])
    scored = tmp_path / "scored"
    scored.mkdir()
    base = ["evaluate", "--rater", str(tmp_path / "rater"), "--out", str(tmp_path / "ev")]

    assert main([*base, "--scored", str(scored), "--heldout", str(held)]) == 2
    assert "no part-*.parquet files" in capsys.readouterr().err
    assert main(["score", "--rater", str(tmp_path / "rater"), "--data", str(held),
                 "--out", str(scored), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--scored", str(scored), "--heldout", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    args = [*base, "--scored", str(scored), "--heldout", str(held)]
    assert main([*args, "--filtered", str(tmp_path / "kept")]) == 2
    assert "stats.json does not exist" in capsys.readouterr().err
    assert main([*args, "--text-column", "body"]) == 2
    assert "no column 'body'" in capsys.readouterr().err
    assert main([*args, "--rhos", "50,75"]) == 2  # percent, not fractions
    assert "--rhos are discard fractions" in capsys.readouterr().err
    assert main([*args, "--rhos", "0.5,"]) == 2
    assert "comma-separated fractions" in capsys.readouterr().err
    assert main([*args, "--sizes", "toy,nosuch"]) == 2
    assert "unknown model size(s) ['nosuch']" in capsys.readouterr().err
    kept = tmp_path / "kept"
    kept.mkdir()
    for stats, message in (
        ({"rows": 3}, "no usable kept_fraction"),
        ({"kept_fraction": 0.0}, "kept_fraction must be in (0, 1]"),
    ):
        (kept / "stats.json").write_text(json.dumps(stats))
        assert main([*args, "--filtered", str(kept)]) == 2
        assert message in capsys.readouterr().err
    # a NaN score in a shard
    part = next(scored.glob("part-*.parquet"))
    table = pq.read_table(part)
    values = table.column(SCORE_COLUMN).to_pylist()
    values[2] = float("nan")
    table = table.set_column(table.column_names.index(SCORE_COLUMN), SCORE_COLUMN,
                             pa.array(values, pa.float32()))  # fmt: skip
    pq.write_table(table, part)
    assert main(args) == 2
    assert f"{part.name}: row 2 has no finite score" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()  # nothing written before the inputs are good


@pytest.mark.filterwarnings("ignore:.*validation documents also occur")
@pytest.mark.filterwarnings("ignore:each curve has")
def test_an_evaluation_stopped_by_a_crash_resumes_and_loses_nothing(tmp_path, monkeypatch):
    """Killed in the middle (here: the fifth training run raises), rerun with the same data and
    settings: only the runs left are trained (the reference LM included), and the report is
    the one an uninterrupted evaluation writes. Other settings or data are refused, named."""
    import datarater.evaluation.evaluate as ev

    texts, val, scores, tok, rater_cfg = _small_pool()
    cfg = EvalConfig(sizes=("toy",), rhos=(0.25, 0.5), steps=4, batch=4, seq_len=32,
                     eval_every=2)  # fmt: skip
    calls = []
    real = ev.train_lm

    def counted(*args, **kw):
        calls.append(args[0])
        if crash_at and len(calls) == crash_at:
            raise RuntimeError("the machine went away")
        return real(*args, **kw)

    monkeypatch.setattr(ev, "train_lm", counted)

    def evaluate(folder, **kw):
        args = dict(texts=texts, scores=scores, val_texts=val, tokenizer=tok, cfg=cfg)
        args.update({"progress": False, **kw})
        return run_evaluation(out=tmp_path / folder, rater_cfg=rater_cfg, **args)

    crash_at = 0
    whole = evaluate("whole")
    n_runs = len(calls)  # 3 arms, the reference LM, 3 perplexity arms
    assert n_runs == 7
    crash_at, calls[:] = 5, []
    with pytest.raises(RuntimeError, match="went away"):
        evaluate("crashed")
    assert not (tmp_path / "crashed" / "evaluation.json").exists()  # nothing half-written
    crash_at, calls[:] = 0, []
    resumed = evaluate("crashed", progress=True)  # the bar counts the runs read back
    assert len(calls) == n_runs - 4  # the four finished before the crash are not retrained
    assert resumed == whole
    assert (tmp_path / "crashed" / "evaluation.md").read_text() == (
        tmp_path / "whole" / "evaluation.md"
    ).read_text()
    calls[:] = []
    assert evaluate("crashed") == whole and calls == []  # a finished evaluation, read back
    with pytest.raises(ValueError, match=r"other settings or data \(config.steps: 4 -> 6\)"):
        evaluate("crashed", cfg=replace(cfg, steps=6))
    with pytest.raises(ValueError, match=r"\(data.pool and scores: \w{12}\.\.\. -> \w{12}\.\.\.\)"):
        evaluate("crashed", scores=scores.flip(0))
    # rhos equal to six digits are distinct runs (their files were one before)
    calls[:] = []
    close = replace(cfg, rhos=(0.25, 0.2500001), baselines=False)
    rep = evaluate("close", cfg=close)
    assert len(calls) == 3  # (each trained: equal here, as both draw 6 candidates per 4)
    assert [r["rho"] for r in rep["runs"] if r["arm"] == "datarater"] == [0.25, 0.2500001]
    # runs without their settings cannot be matched to anything
    (tmp_path / "close" / "runs" / "settings.json").unlink()
    with pytest.raises(ValueError, match="finished runs but no settings.json"):
        evaluate("close", cfg=close)
    (tmp_path / "whole" / "runs" / "settings.json").write_text("{not json")
    with pytest.raises(ValueError, match="settings.json is unreadable"):
        evaluate("whole")


def test_a_sweep_whose_runs_all_diverged_says_so(tmp_path, monkeypatch):
    """No finite run: rho 0.5 is used for the larger sizes, and the report warns that it is
    no best (a NaN used to win the min)."""
    import datarater.evaluation.evaluate as ev

    texts, val, scores, tok, rater_cfg = _small_pool()
    cfg = EvalConfig(sizes=("toy",), rhos=(0.25, 0.75), steps=2, batch=4, seq_len=32,
                     eval_every=1, baselines=False)  # fmt: skip
    real = ev.train_lm

    def diverging(*args, **kw):
        trained = real(*args, **kw)
        if kw.get("scores") is not None:  # the rater's arms
            trained.curve[-1] = (trained.curve[-1][0], math.nan)
        return trained

    monkeypatch.setattr(ev, "train_lm", diverging)
    with pytest.warns(UserWarning, match="every run of the rho sweep diverged"):
        args = dict(texts=texts, scores=scores, val_texts=val, tokenizer=tok, cfg=cfg)
        report = run_evaluation(out=tmp_path / "e", rater_cfg=rater_cfg, progress=False, **args)
    assert any("diverged" in w for w in report["warnings"])
