"""Scoring with a trained rater: in memory, shard files, resume, bad shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datarater.cli import main
from datarater.models import Rater, TransformerConfig
from datarater.scoring.score import SCORE_COLUMN, score_texts
from datarater.training import load_rater, save_rater

from .conftest import torchrun


def _rater_in_memory():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)
    rater = Rater(cfg, pad_id=257).eval()
    with torch.no_grad():
        rater.head.weight.normal_(0, 1.0)
    return rater, cfg


def _rater(tmp_path):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)
    rater = Rater(cfg, pad_id=257)
    with torch.no_grad():
        rater.head.weight.normal_(0, 1.0)
    folder = tmp_path / "rater"
    save_rater(rater, folder)
    return rater, folder


def test_scores_do_not_depend_on_batching_and_windows_aggregate(tmp_path):
    rater, _ = _rater(tmp_path)
    texts = ["short", "a bit longer text here", "x" * 100, "medium sized document"]
    one = score_texts(rater, texts, batch_size=1)
    many = score_texts(rater, texts, batch_size=3)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)
    truncated = score_texts(rater, ["y" * 100], aggregate="truncate")
    first = score_texts(rater, ["y" * 32])
    torch.testing.assert_close(truncated, first)
    # 100 bytes + EOS = 101 tokens: windows of 32, 32, 32 and 5 tokens
    y = ord("y")
    wins = [[y] * 32, [y] * 32, [y] * 32, [y] * 4 + [256]]
    with torch.no_grad():
        per = torch.stack([rater(torch.tensor([w]))[0] for w in wins])
    mean = score_texts(rater, ["y" * 100], aggregate="mean")
    weighted = score_texts(rater, ["y" * 100], aggregate="token_weighted")
    torch.testing.assert_close(mean[0], per.mean(), rtol=1e-5, atol=1e-6)
    sizes = torch.tensor([32.0, 32, 32, 5])
    torch.testing.assert_close(weighted[0], (per * sizes).sum() / sizes.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="aggregate"):
        score_texts(rater, texts, aggregate="max")


def test_score_cli_writes_every_row_once_and_resumes(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        rows = [{"text": f"document {i}-{j} " * (j + 1), "source": f"s{i}"} for j in range(5)]
        (data / f"shard{i}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(
        pa.table({"text": ["parquet row", "another"], "n": [1, 2]}), data / "shard3.parquet"
    )
    out = tmp_path / "scored"
    assert (
        main(["score", "--rater", str(folder), "--data", str(data), "--out", str(out), "--quiet"])
        == 0
    )
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 4 and len(list(out.glob("*.done"))) == 4
    table = pq.read_table(parts[0])
    assert SCORE_COLUMN in table.column_names and "source" in table.column_names
    total = sum(pq.read_table(p).num_rows for p in parts)
    assert total == 17
    # a crash that lost one shard's output: the rerun redoes exactly that shard
    (out / "part-00001.done").unlink()
    (out / "part-00001.parquet").unlink()
    capsys.readouterr()
    assert (
        main(["score", "--rater", str(folder), "--data", str(data), "--out", str(out), "--quiet"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["done"] == 1 and report["skipped"] == 3
    assert sum(pq.read_table(p).num_rows for p in out.glob("part-*.parquet")) == 17


def test_a_corrupt_shard_is_reported_and_the_others_finish(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"body": "x"}))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "numbers.jsonl").write_text('{"text": 7}\n{"text": 8}\n')
    code = main(
        [
            "score",
            "--rater",
            str(folder),
            "--data",
            str(tmp_path / "good.jsonl"),
            str(tmp_path / "bad.parquet"),
            str(tmp_path / "nocol.jsonl"),
            str(tmp_path / "empty.jsonl"),
            str(tmp_path / "numbers.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "no column 'text'" in err
    assert "empty.jsonl: ValueError: empty file" in err
    assert "numbers.jsonl" in err
    assert "row 0 of 'text' is not text: 7 (int), one of 2 such rows; --skip-bad-rows" in err
    assert len(list((tmp_path / "o").glob("part-*.parquet"))) == 1  # nothing half-written
    assert len(list((tmp_path / "o").glob("*.done"))) == 1
    assert (
        main(
            [
                "score",
                "--rater",
                str(tmp_path / "nowhere"),
                "--data",
                "x",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("rule", ["topk", "paccept", "quantile"])
def test_filter_cli_keeps_the_best_share_and_reports_per_source(tmp_path, capsys, rule):
    out = tmp_path / "scored"
    out.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        s = torch.randn(400, generator=gen)
        pq.write_table(
            pa.table(
                {
                    "text": [f"r{j}" for j in range(400)],
                    "source": ["a" if j % 2 else "b" for j in range(400)],
                    SCORE_COLUMN: pa.array(s.numpy(), pa.float32()),
                }
            ),
            out / f"part-{i:05d}.parquet",
        )
    assert (
        main(
            [
                "filter",
                "--scored",
                str(out),
                "--out",
                str(tmp_path / "kept"),
                "--rule",
                rule,
                "--rho",
                "0.75",  # and the default --batch (64): what a user runs first
                "--source-column",
                "source",
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "kept" / "stats.json").read_text())
    assert stats["rows"] == 1200
    assert stats["kept_fraction"] == pytest.approx(0.25, abs=0.05)
    assert set(stats["kept_fraction_by_source"]) == {"a", "b"}
    kept = sum(pq.read_table(p).num_rows for p in (tmp_path / "kept").glob("part-*.parquet"))
    assert kept == stats["kept"]
    kept_scores = torch.cat(
        [
            torch.tensor(pq.read_table(p).column(SCORE_COLUMN).to_numpy())
            for p in (tmp_path / "kept").glob("part-*.parquet")
        ]
    )
    assert float(kept_scores.mean()) > 0.8  # the top quarter of a standard normal: ~1.27
    # a folder holding parts another run wrote: readers would take them for kept rows
    (tmp_path / "kept" / "part-00007.parquet").write_bytes(b"from another run")
    again = ["filter", "--scored", str(out), "--rule", rule, "--rho", "0.5"]
    assert main([*again, "--out", str(tmp_path / "kept")]) == 2
    assert "holds parts that this run would not replace" in capsys.readouterr().err
    assert main([*again, "--out", str(out)]) == 2
    assert "is the scored folder itself" in capsys.readouterr().err
    # a missing column is found before anything is written (the rule reads scores first)
    missing = ["filter", "--scored", str(out), "--out", str(tmp_path / "none"), "--rule", rule]
    assert main([*missing, "--source-column", "language"]) == 2
    assert "part-00000.parquet: no 'language' column" in capsys.readouterr().err
    assert not list((tmp_path / "none").glob("part-*"))
    # null sources are a group of their own, in filter and analyze alike
    nulls = tmp_path / "nulls"
    nulls.mkdir()
    src = [None if j % 3 == 0 else ("a" if j % 2 else "b") for j in range(60)]
    scored_nulls = {"text": [f"t{j}" for j in range(60)], "source": src, SCORE_COLUMN: [0.1] * 60}
    pq.write_table(pa.table(scored_nulls), nulls / "part-00000.parquet")
    assert main(["filter", "--scored", str(nulls), "--out", str(tmp_path / "nk")]
                + ["--source-column", "source"]) == 0  # fmt: skip
    by = json.loads((tmp_path / "nk" / "stats.json").read_text())["kept_fraction_by_source"]
    assert set(by) == {"(missing)", "a", "b"}
    capsys.readouterr()
    assert main(["analyze", "--scored", str(nulls), "--out", str(tmp_path / "na")]
                + ["--source-column", "source"]) == 0  # fmt: skip
    means = json.loads((tmp_path / "na" / "analysis.json").read_text())["mean_score_by_source"]
    assert set(means) == {"(missing)", "a", "b"}
    holes = pa.table({"text": ["a", "b"], SCORE_COLUMN: pa.array([1.0, None], pa.float32())})
    (tmp_path / "holes").mkdir()
    pq.write_table(holes, tmp_path / "holes" / "part-00000.parquet")
    assert main(["filter", "--scored", str(tmp_path / "holes"), "--out", str(tmp_path / "h")]) == 2
    assert "part-00000.parquet: 1 scores are missing or NaN" in capsys.readouterr().err
    empty = pa.table({"text": pa.array([], pa.string()), SCORE_COLUMN: pa.array([], pa.float32())})
    (tmp_path / "empty_parts").mkdir()
    pq.write_table(empty, tmp_path / "empty_parts" / "part-00000.parquet")
    nothing = ["filter", "--scored", str(tmp_path / "empty_parts"), "--out", str(tmp_path / "e")]
    assert main(nothing) == 2 and "hold no rows" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert main(["filter", "--scored", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2


def test_a_filter_stopped_half_way_is_taken_for_neither_run(tmp_path, monkeypatch):
    """Rerun into its old --out with another rho and stopped after one part, a filter leaves
    new and old parts side by side: without stats.json (written last, removed first) nothing
    reads them as kept rows; the rerun to the end equals a run into a fresh folder."""
    import datarater.scoring.filter_files as ff
    from datarater.cli import _kept_rows

    scored = tmp_path / "scored"
    scored.mkdir()
    for i in range(3):
        rows = {
            "text": [f"doc{i}-{j}" for j in range(100)],
            SCORE_COLUMN: [float(j) for j in range(100)],
        }
        pq.write_table(pa.table(rows), scored / f"part-{i:05d}.parquet")
    out = tmp_path / "kept"
    ff.filter_files(scored, out, "quantile", 0.5)
    assert len(_kept_rows(str(out), "text")[0]) == 150
    real, written = ff.atomic_write, []

    def dying(path, write):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real(path, write)

    monkeypatch.setattr(ff, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        ff.filter_files(scored, out, "quantile", 0.9)
    monkeypatch.undo()
    assert not (out / "stats.json").exists()
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="a filter stopped before it finished"):
        _kept_rows(str(out), "text")
    ff.filter_files(scored, out, "quantile", 0.9)
    ff.filter_files(scored, tmp_path / "fresh", "quantile", 0.9)
    assert _kept_rows(str(out), "text") == _kept_rows(str(tmp_path / "fresh"), "text")
    assert len(_kept_rows(str(out), "text")[0]) == 30


def test_analyze_cli_on_scored_shards(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    data = tmp_path / "d.jsonl"
    rows = [
        {
            "text": ("Plain words here. " * (i % 5 + 1)) if i % 2 else "ZZ%%##!! " * 6,
            "src": "clean" if i % 2 else "junk",
        }
        for i in range(40)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        main(
            [
                "score",
                "--rater",
                str(folder),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "s"),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "analyze",
                "--scored",
                str(tmp_path / "s"),
                "--out",
                str(tmp_path / "a"),
                "--source-column",
                "src",
                "--compare-rater",
                str(folder),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 40 and summary["rank_correlation_with_other"] > 0.999
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert set(report["mean_score_by_source"]) == {"clean", "junk"}
    assert (tmp_path / "a" / "score_histograms.png").exists()
    page = (tmp_path / "a" / "analysis.md").read_text()
    assert f"OLS R^2 of the score on all heuristics: **{report['ols_r2']:.3f}**" in page
    assert "| junk |" in page and "## Lowest-scored documents" in page
    assert page.count("\n| ") >= 2 * 10 + len(report["pearson"])  # every row is a table row
    # a folder scored with windows is compared with the same aggregation (a rater compared
    # with itself must agree); --max-rows samples uniformly and says so
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "tw"), "--aggregate", "token_weighted"]) == 0
    capsys.readouterr()
    again = ["analyze", "--scored", str(tmp_path / "tw"), "--out", str(tmp_path / "a2")]
    assert main([*again, "--compare-rater", str(folder), "--max-rows", "15"]) == 0
    sampled = json.loads((tmp_path / "a2" / "analysis.json").read_text())
    assert sampled["rank_correlation_with_other"] > 0.99
    assert sampled["compared_with"]["aggregate"] == "token_weighted"
    assert sampled["n"] == 15 and sampled["total"] == 40
    rows = [r["row"] for r in sampled["lowest"] + sampled["highest"]]
    assert all(0 <= r < 40 for r in rows) and max(rows) >= 15  # not just the first 15 rows
    assert "(a uniform sample of 40)" in (tmp_path / "a2" / "analysis.md").read_text()


def test_read_scored_reads_a_sample_part_by_part(tmp_path):
    """``rows`` gives exactly those rows of the full read, reading only the parts that hold
    them (analyze samples a large folder without reading every text); errors name the row in
    its part."""
    from datarater.scoring.score import count_scored, read_scored

    sizes = [7, 0, 12, 5]
    schema = pa.schema([("text", pa.string()), (SCORE_COLUMN, pa.float32()), ("n", pa.int64())])
    for i, n in enumerate(sizes):
        rows = {"text": [f"p{i}r{j}" for j in range(n)], SCORE_COLUMN: [j / 2 for j in range(n)]}
        table = pa.table({**rows, "n": list(range(n))}, schema=schema)
        pq.write_table(table, tmp_path / f"part-{i:05d}.parquet")
    assert count_scored(tmp_path) == sum(sizes)
    cols = ["text", SCORE_COLUMN]
    whole = read_scored(tmp_path, cols, ["text"])
    pick = [0, 6, 7, 18, 23]
    part = read_scored(tmp_path, cols, ["text"], rows=pick)
    assert part == {c: [whole[c][i] for i in pick] for c in cols}
    assert read_scored(tmp_path, cols, rows=[]) == {c: [] for c in cols}
    bad = pa.table({"text": ["ok", None, "fine"], SCORE_COLUMN: [1.0, 2.0, 3.0]})
    pq.write_table(bad, tmp_path / "part-00009.parquet")
    with pytest.raises(ValueError, match=r"part-00009.parquet: row 1 of 'text' is not text"):
        read_scored(tmp_path, cols, ["text"], rows=[24, 25])
    assert read_scored(tmp_path, cols, ["text"], rows=[24, 26])["text"] == ["ok", "fine"]
    with pytest.raises(ValueError, match="no column 'language'"):
        read_scored(tmp_path, ["language"])


def test_score_dataset_adds_a_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    from datarater.scoring.score import score_dataset

    rater, _ = _rater(tmp_path)
    ds = datasets.Dataset.from_dict({"text": ["one", "two two", "three three three"]})
    out = score_dataset(rater, ds)
    assert out.column_names == ["text", SCORE_COLUMN]
    torch.testing.assert_close(
        torch.tensor(out[SCORE_COLUMN]), score_texts(rater, ds["text"]), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="no column 'body'"):
        score_dataset(rater, ds, "body")


def test_two_rank_scoring_killed_midway_then_rerun(tmp_path):
    import os
    import pydoc_data.topics as topics
    import signal
    import subprocess
    import sys
    import time

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=128, d_model=64, n_layers=2, n_heads=2)
    rater = Rater(cfg, pad_id=257)
    folder = tmp_path / "rater"
    save_rater(rater, folder)
    text = " ".join(topics.topics.values())
    data = tmp_path / "data"
    data.mkdir()
    for s in range(8):
        rows = [
            {"text": text[(s * 300 + j) * 97 : (s * 300 + j) * 97 + 400], "id": s * 300 + j}
            for j in range(300)
        ]
        (data / f"shard{s}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["score", "--rater", str(folder), "--data", str(data), "--quiet", "--device", "cpu"]
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "datarater.cli", *base, "--out", str(single)],
        check=True,
        env=env,
        capture_output=True,
    )
    two = tmp_path / "two"
    cmd = torchrun("-m", "datarater.cli", *base, "--out", str(two))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if two.exists() and len(list(two.glob("*.done"))) >= 2:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(two.glob("*.done")))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, scores = {}, {}
    for folder_, store in ((single, scores), (two, ids)):
        for p in folder_.glob("part-*.parquet"):
            tab = pq.read_table(p)
            for i, sc in zip(tab.column("id").to_pylist(), tab.column(SCORE_COLUMN).to_pylist()):
                assert i not in store, f"row {i} twice in {folder_.name}"
                store[i] = sc
    assert sorted(ids) == list(range(2400)) and sorted(scores) == list(range(2400))
    assert all(ids[i] == scores[i] for i in ids), "scores differ from the single-process run"
    assert 2 <= done_before < 8, f"the kill landed after {done_before} of 8 shards"


@pytest.mark.parametrize("failure", ["a bad shard", "an error raised"])
def test_a_failing_rank_under_torchrun_does_not_stop_the_others(tmp_path, failure):
    """torchrun stops every process once one exits with an error: the rank that fails (its
    shard is not JSON, or an error is injected into its scoring through a sitecustomize
    module) waits at the barrier, so the other finishes its shard (and reruns are not
    stopped at the same place each time)."""
    import os
    import pydoc_data.topics as topics
    import subprocess

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=128, d_model=64, n_layers=2, n_heads=2)
    folder = tmp_path / "rater"
    save_rater(Rater(cfg, pad_id=257), folder)
    text = " ".join(topics.topics.values())
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": text[j * 53 : j * 53 + 400], "id": j} for j in range(2000)]
    (data / "b_big.jsonl").write_text("\n".join(json.dumps(r) for r in rows))  # rank 1's
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if failure == "a bad shard":
        (data / "a_first.jsonl").write_text('{"text": "fine"}\n{"text": \n')  # rank 0's
        expected = "a_first.jsonl"
    else:
        (data / "a_first.jsonl").write_text(json.dumps({"text": "fine", "id": -1}))
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(
            "import os\n"
            "if os.environ.get('RANK') == '0':\n"
            "    import datarater.scoring.score as score\n"
            "    def fail(*args, **kwargs):\n"
            "        raise RuntimeError('injected fault')\n"
            "    score._launch = fail\n"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
        expected = "injected fault"
    out = tmp_path / "scored"
    cmd = torchrun("-m", "datarater.cli", "score", "--rater", str(folder), "--data", str(data),
                   "--quiet", "--device", "cpu", "--out", str(out))  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and expected in done.stderr
    parts = [pq.read_table(p) for p in out.glob("part-*.parquet")]
    assert sorted(i for t in parts for i in t.column("id").to_pylist()) == list(range(2000))


def test_incompatible_or_broken_rater_checkpoints_are_named(tmp_path, capsys):
    from datarater.training import load_rater

    _, folder = _rater(tmp_path)
    assert load_rater(folder).tokenizer == "bytes"
    cfg_path = folder / "config.json"
    good = cfg_path.read_text()
    meta = json.loads(good)
    meta["rater"]["d_model"] = 24  # another run's config beside these weights
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rater.safetensors: weights do not match"):
        load_rater(folder)
    out = tmp_path / "scored"
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code = main(["score", "--rater", str(folder), "--data", str(data), "--out", str(out)])
    assert code == 2 and "weights do not match" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written

    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a rater config"):
        load_rater(folder)
    meta["rater"] = {"d_model": 16, "colour": "blue"}
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json: not a rater config"):
        load_rater(folder)
    cfg_path.write_text(good)
    (folder / "rater.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="rater.safetensors: unreadable"):
        load_rater(folder)
    (folder / "rater.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rater.safetensors does not exist"):
        load_rater(folder)


def test_a_tokenizer_that_does_not_fit_the_rater_is_refused():
    cfg = TransformerConfig(vocab_size=300, max_seq_len=16, d_model=8, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="does not fit the rater's vocabulary of 300"):
        score_texts(Rater(cfg), ["some text"])


def test_a_rater_folder_without_embedded_config_is_still_checked(tmp_path):
    """Weights saved without the config in their metadata (older folders): shapes decide."""
    from safetensors.torch import save_file

    from datarater.training import load_rater

    rater, folder = _rater(tmp_path)
    save_file({k: v.contiguous() for k, v in rater.state_dict().items()},
              str(folder / "rater.safetensors"))  # fmt: skip
    assert load_rater(folder).cfg == rater.cfg
    meta = json.loads((folder / "config.json").read_text())
    meta["rater"]["d_model"] = 24
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rater.safetensors: weights do not match"):
        load_rater(folder)


def test_scoring_leaves_the_callers_rater_alone_and_masks_padding():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)
    rater = Rater(cfg)  # no pad_id: scoring must still mask its padding
    rater.train()
    texts = ["short", "a rather longer document than the first one", "mid length"]
    one = score_texts(rater, texts, batch_size=1)
    many = score_texts(rater, texts, batch_size=3)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)
    assert rater.training and rater.pad_id is None
    assert next(rater.parameters()).dtype == torch.float32


def test_a_missing_tokenizer_file_is_named(tmp_path):
    from datarater.data import get_tokenizer

    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a tokenizers JSON file"):
        get_tokenizer(str(tmp_path / "bad.json"))


def test_rerun_needs_the_recorded_inputs_new_ones_get_new_parts_each_is_taken_once(
    tmp_path, capsys
):
    _, folder = _rater(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("b", "c"):
        (data / f"{name}.jsonl").write_text(json.dumps({"text": f"doc {name}"}) + "\n")
    out = data / "scored"  # inside the input folder: its parts must not become inputs
    args = ["score", "--rater", str(folder), "--out", str(out), "--quiet", "--data"]
    assert main([*args, str(data), str(data / "b.jsonl")]) == 0  # b given twice: scored once
    rows = sum(pq.read_table(p).num_rows for p in out.glob("part-*.parquet"))
    assert rows == 2
    assert main([*args, str(data)]) == 0  # same inputs again: all skipped
    # A new shard that sorts before the old ones gets the next part number: nothing shifts,
    # only it is scored.
    (data / "a.jsonl").write_text(json.dumps({"text": "doc a"}) + "\n")
    old_parts = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    capsys.readouterr()
    assert main([*args, str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["done"] == 1 and report["skipped"] == 2
    assert all((out / name).read_bytes() == b for name, b in old_parts.items())
    assert pq.read_table(out / "part-00002.parquet").column("text").to_pylist() == ["doc a"]
    # the order the inputs are given in does not matter either
    assert main([*args, str(data / "c.jsonl"), str(data / "a.jsonl"), str(data / "b.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 3
    # a recorded input left out would leave its part without its input
    assert main([*args, str(data / "a.jsonl"), str(data / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "1 of the 3 input files" in err and "b.jsonl" in err
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(3)
    ]


def test_windows_scores_are_plain_tensors_and_single_token_tails_fold_away():
    rater, _ = _rater_in_memory()
    # 32 bytes + EOS: a full window and a lone EOS, which is not scored on its own
    mean = score_texts(rater, ["z" * 32], aggregate="mean")
    torch.testing.assert_close(mean, score_texts(rater, ["z" * 32], aggregate="truncate"))
    mean -= 1.0  # an ordinary tensor, not an inference one
    ids = torch.randint(0, 256, (3, 32))
    with torch.inference_mode():
        torch.testing.assert_close(rater(ids, padded=False), rater(ids))


def test_a_failure_while_queueing_a_shard_keeps_the_shard_scored_before(tmp_path):
    """Shard k is written only after shard k+1 is queued; if queueing k+1 fails, shard k is
    still written (with its marker) before the error, and a rerun finishes the rest."""
    from datarater.scoring.score import score_files

    rater, _ = _rater_in_memory()
    for i in range(3):
        rows = [json.dumps({"text": f"shard {i} row {j} " * (j + 1)}) for j in range(5)]
        (tmp_path / f"s{i}.jsonl").write_text("\n".join(rows))
    files = [str(tmp_path / f"s{i}.jsonl") for i in range(3)]

    class Broken(torch.nn.Module):  # fails on the second shard's only batch
        def __init__(self):
            super().__init__()
            self.inner, self.cfg, self.pad_id, self.calls = rater, rater.cfg, rater.pad_id, 0

        def forward(self, ids, padded=True):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("out of memory (simulated)")
            return self.inner(ids, padded=padded)

    with pytest.raises(RuntimeError, match="simulated"):
        score_files(Broken(), files, "text", tmp_path / "out", batch_size=64, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.done")) == ["part-00000.done"]
    report = score_files(rater, files, "text", tmp_path / "out", batch_size=64, progress=False)
    assert report["skipped"] == 1 and report["done"] == 2
    texts = [pq.read_table(p).column("text").to_pylist()
             for p in sorted((tmp_path / "out").glob("part-*.parquet"))]  # fmt: skip
    assert sum(len(t) for t in texts) == 15


def _compressed(path, rows, codec: str) -> None:
    """Write jsonl rows through one of pyarrow's codecs (what the name's suffix says)."""
    data = "\n".join(json.dumps(r) for r in rows).encode()
    with pa.OSFile(str(path), "wb") as raw, pa.CompressedOutputStream(raw, codec) as out:
        out.write(data)


def test_score_reads_compressed_jsonl_and_saved_datasets(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rater, folder = _rater(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    texts = {}
    for codec, suffix in (("gzip", "gz"), ("bz2", "bz2"), ("zstd", "zst"), ("lz4", "lz4")):
        rows = [{"text": f"{codec} document {j} " * (j + 1), "j": j} for j in range(3)]
        _compressed(data / f"shard.jsonl.{suffix}", rows, codec)
        texts.update({r["text"]: codec for r in rows})
    (data / "metadata.json").write_text('{\n "not": "a shard"\n}\n')  # a folder's .json: skipped
    saved = tmp_path / "saved"
    ds = datasets.Dataset.from_dict({"text": ["from arrow one", "from arrow two"], "k": [1, 2]})
    ds.save_to_disk(str(saved), num_shards=2)
    texts.update({t: "arrow" for t in ds["text"]})
    out = tmp_path / "scored"
    args = ["score", "--rater", str(folder), "--data", str(data), str(saved), "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["done"] == 6 and report["rows"] == 14  # four codecs, two Arrow shards
    table = pa.concat_tables(
        [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))], promote_options="default"
    )
    got = dict(zip(table.column("text").to_pylist(), table.column(SCORE_COLUMN).to_pylist()))
    assert sorted(got) == sorted(texts)  # every row once, from every kind of shard
    expected = score_texts(rater, list(got))
    torch.testing.assert_close(torch.tensor(list(got.values())), expected, rtol=1e-5, atol=1e-6)

    # a DatasetDict folder: which split is the user's choice, and the error names them
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    code = main(["score", "--rater", str(folder), "--data", str(tmp_path / "dd"), "--out", "x"])
    assert code == 2 and "splits ['train', 'test']" in capsys.readouterr().err


def test_a_corrupt_compressed_shard_is_reported_and_the_others_finish(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    _compressed(tmp_path / "good.jsonl.gz", [{"text": "fine"}, {"text": "also fine"}], "gzip")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip data at all")
    _compressed(tmp_path / "cut.jsonl.zst", [{"text": "t" * 5000}] * 200, "zstd")
    whole = (tmp_path / "cut.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])  # truncated mid-way
    out = tmp_path / "o"
    code = main(
        ["score", "--rater", str(folder), "--data", str(tmp_path / "*.jsonl.*"), "--out", str(out)]
        + ["--quiet"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.jsonl.gz" in err and "cut.jsonl.zst" in err and "good.jsonl.gz" not in err
    assert [pq.read_table(p).num_rows for p in out.glob("part-*.parquet")] == [2]


def test_score_refuses_runs_that_would_score_nothing_or_mix_two_kinds_of_scores(
    tmp_path, capsys, monkeypatch
):
    _, folder = _rater(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"s{i}.jsonl").write_text(json.dumps({"text": f"row of shard {i}"}))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a text file is a corpus for train, not a shard")

    def score(*args: str) -> int:
        return main(["score", "--rater", str(folder), "--quiet", *args])

    # nothing to score is an error, not "done": 0 with exit status 0
    assert score("--data", str(texts), "--out", str(tmp_path / "o1")) == 2
    assert "no input files" in capsys.readouterr().err
    assert score("--data", str(shards), "--out", str(shards)) == 2
    assert "all 2 input files are under the output folder" in capsys.readouterr().err
    # a rerun from another directory, the inputs named another way: the same run
    out = tmp_path / "scored"
    monkeypatch.chdir(tmp_path)
    assert score("--data", "shards", "--out", str(out)) == 0
    monkeypatch.chdir(shards)
    capsys.readouterr()
    assert score("--data", str(shards), "--out", str(out)) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    # another rater or aggregation into the same folder would mix two kinds of scores
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_rater(Rater(load_rater(folder).cfg, pad_id=257), other)
    assert main(["score", "--rater", str(other), "--data", str(shards), "--out", str(out)]) == 2
    assert "another rater or other settings (rater_weights:" in capsys.readouterr().err
    assert score("--data", str(shards), "--out", str(out), "--aggregate", "mean") == 2
    assert "aggregate: 'truncate' then, 'mean' now" in capsys.readouterr().err


def test_scoring_in_python_names_bad_input_and_streams_iterable_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    from datarater.scoring.score import score_dataset

    rater, folder = _rater(tmp_path)
    assert not load_rater(folder).training  # loaded to score
    with pytest.raises(TypeError, match="not one string"):
        score_texts(rater, "hello world")
    with pytest.raises(ValueError, match=r"texts\[1\] is not text: None"):
        score_texts(rater, ["fine", None])
    texts = ["one", "two two", "three three three"]
    torch.testing.assert_close(score_texts(rater, iter(texts)), score_texts(rater, texts))
    ds = datasets.Dataset.from_dict({"text": texts})
    with pytest.raises(TypeError, match=r"a DatasetDict \(splits \['test', 'train'\]\)"):
        score_dataset(rater, datasets.DatasetDict({"train": ds, "test": ds}))
    scored = score_dataset(rater, ds)
    with pytest.raises(ValueError, match="already has a 'datarater_score' column"):
        score_dataset(rater, scored)
    consumed = []

    def rows_of():
        for t in texts:
            consumed.append(t)
            yield {"text": t}

    streamed = score_dataset(rater, datasets.IterableDataset.from_generator(rows_of), batch_size=2)
    assert consumed == []  # nothing read, nothing scored until it is iterated
    rows = list(streamed)
    assert [r["text"] for r in rows] == texts
    torch.testing.assert_close(
        torch.tensor([r[SCORE_COLUMN] for r in rows]), torch.tensor(scored[SCORE_COLUMN])
    )
    # a row without text: named by its place in the stream (not in its batch), or left out
    holey = ["t"] * 1500
    holey[1100] = None
    ds2 = datasets.Dataset.from_dict({"text": holey, "i": list(range(1500))})
    stream = score_dataset(rater, ds2.to_iterable_dataset())
    for _ in range(2):  # the same row, however often the stream is iterated
        with pytest.raises(ValueError, match="row 1100 of 'text' is not text: None"):
            list(stream)
    with pytest.raises(ValueError, match="row 1100 of 'text'.*skip_bad_rows=True"):
        score_dataset(rater, ds2)
    kept = list(score_dataset(rater, ds2.to_iterable_dataset(), skip_bad_rows=True))
    assert [r["i"] for r in kept] == [i for i in range(1500) if i != 1100]
    with pytest.warns(UserWarning, match="left out 1 rows without text"):
        eager = score_dataset(rater, ds2, skip_bad_rows=True)
    assert eager["i"] == [r["i"] for r in kept]
    torch.testing.assert_close(
        torch.tensor(eager[SCORE_COLUMN]), torch.tensor([r[SCORE_COLUMN] for r in kept])
    )


def test_skip_bad_rows_leaves_out_rows_without_text_and_counts_them(tmp_path, capsys):
    rater, folder = _rater(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"good row {i}", "i": i}) for i in range(300)]
    lines[270] = json.dumps({"text": 7, "i": 270})  # pyarrow refuses the whole shard for this
    lines[5] = json.dumps({"text": None, "i": 5})
    lines[6] = '{"text": "cut short'
    (data / "a.jsonl").write_text("\n".join(lines))
    table = pa.table({"text": ["fine", None, "also fine"], "i": [0, 1, 2]})
    pq.write_table(table, data / "b.parquet")
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 1  # the default: shards fail
    err = capsys.readouterr().err
    assert "a.jsonl" in err and "b.parquet" in err and "--skip-bad-rows" in err
    out = tmp_path / "lenient"
    assert main([*args, "--out", str(out), "--skip-bad-rows"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bad_rows"] == {str(data / "a.jsonl"): 3, str(data / "b.parquet"): 1}
    assert report["rows"] == 297 + 2
    first = pq.read_table(out / "part-00000.parquet")
    assert first.column("i").to_pylist() == [i for i in range(300) if i not in (5, 6, 270)]
    texts = first.column("text").to_pylist()
    torch.testing.assert_close(
        torch.tensor(first.column(SCORE_COLUMN).to_pylist()), score_texts(rater, texts)
    )
    assert json.loads((out / "part-00001.done").read_text())["bad_rows"] == 1
    # the flag changes no score (each marker counts the rows its shard left out): a rerun
    # without it finds every shard finished, and the folder records no such setting
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    assert "skip_bad_rows" not in json.loads((out / "inputs.json").read_text())["settings"]
    # the strict run above finished no shard: it is finished in place with the flag on
    assert main([*args, "--out", str(tmp_path / "strict"), "--skip-bad-rows"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 299
    # a column whose values do not share a type even without the bad rows: kept as JSON text
    mixed = [{"text": "a", "meta": 1}, {"text": "b", "meta": "x"}, {"text": None, "meta": 2}]
    (data / "c.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
    assert main([*args, "--out", str(tmp_path / "mixed"), "--skip-bad-rows"]) == 0
    part = pq.read_table(tmp_path / "mixed" / "part-00002.parquet")
    assert part.column("meta").to_pylist() == ["1", '"x"']


def test_score_reads_odd_names_and_upper_case_suffixes(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    _compressed(data / "A.JSONL.GZ", [{"text": "upper case suffix"}], "gzip")
    (data / "train.jsonl-00000-of-00002").write_text(json.dumps({"text": "no known suffix"}))
    files = [str(data / "A.JSONL.GZ"), str(data / "train.jsonl-00000-of-00002")]
    out = tmp_path / "out"
    args = ["score", "--rater", str(folder), "--data", *files, "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    # its settings are recorded and compared
    assert json.loads((out / "inputs.json").read_text())["settings"]["aggregate"] == "truncate"
    assert main([*args, "--aggregate", "mean"]) == 2
    assert "aggregate: 'truncate' then, 'mean' now" in capsys.readouterr().err


def test_run_settings_take_scalar_tensors_and_resolve_auto_precision():
    from datarater.data import ByteTokenizer
    from datarater.scoring.score import run_settings

    rater, _ = _rater_in_memory()
    rater.register_buffer("temperature", torch.tensor(2.0))  # a 0-dim tensor
    got = run_settings(rater, ByteTokenizer(), "text", "truncate", "auto", "cpu")
    assert got["precision"] == "fp32" and got["tokenizer"] == "bytes"
    rater.temperature.fill_(3.0)
    assert (
        run_settings(rater, ByteTokenizer(), "text", "truncate", "auto")["rater_weights"]
        != (got["rater_weights"])
    )


def _jsonl_shards(folder: Path, shards: int, rows: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = (json.dumps({"text": f"shard {s} row {j} " * (j % 5 + 1), "id": s * rows + j})
                 for j in range(rows))  # fmt: skip
        (folder / f"s{s}.jsonl").write_text("\n".join(lines) + "\n")


def test_a_shard_that_never_finished_may_be_dropped_from_a_folder(tmp_path, capsys):
    """A corrupt shard fails; removing it from the inputs lets the folder finish (its part
    number stays reserved), while a finished input may still not go missing."""
    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 3)
    (data / "s1.jsonl").write_text('{"text": \n')  # corrupt: fails, no part
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet", "--out", str(out)]
    assert main(args) == 1
    (data / "s1.jsonl").unlink()
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == 2 and report["left_out"] == 1
    assert sorted(p.name for p in out.glob("*.done")) == ["part-00000.done", "part-00002.done"]
    from datarater.scoring.score import unfinished_inputs

    assert unfinished_inputs(out) == []  # left out on purpose: readers are not warned
    (data / "s2.jsonl").unlink()  # finished: its part would be orphaned
    assert main(args) == 2
    assert "finished already, are not among the inputs now" in capsys.readouterr().err


def test_scoring_a_scored_folder_again_replaces_the_score_column(tmp_path):
    rater, folder = _rater(tmp_path)
    data, first, again = tmp_path / "data", tmp_path / "first", tmp_path / "again"
    _jsonl_shards(data, 1)
    common = ["score", "--rater", str(folder), "--quiet"]
    assert main([*common, "--data", str(data), "--out", str(first)]) == 0
    with torch.no_grad():
        rater.head.weight.mul_(-1.0)  # another rater: other scores
    save_rater(rater, folder)
    assert main([*common, "--data", str(first), "--out", str(again)]) == 0
    old = pq.read_table(first / "part-00000.parquet")
    new = pq.read_table(again / "part-00000.parquet")  # one score column, readable
    assert new.column_names == old.column_names
    torch.testing.assert_close(
        torch.tensor(new.column(SCORE_COLUMN).to_pylist()),
        score_texts(rater, new.column("text").to_pylist()),
    )


def test_on_the_cpu_each_shard_is_written_as_soon_as_it_is_scored(tmp_path, monkeypatch):
    """No device queue to overlap with: a shard's part and marker exist before the next shard
    is scored, so a crash loses no finished shard."""
    from datarater.scoring import score as score_module

    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 3)
    seen, launch = [], score_module._launch

    def spy(*a, **kw):
        seen.append(len(list(out.glob("*.done"))))
        return launch(*a, **kw)

    monkeypatch.setattr(score_module, "_launch", spy)
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert seen == [0, 1, 2]


def test_a_shard_whose_rows_are_all_bad_fails_and_the_others_stand(tmp_path, capsys):
    """--skip-bad-rows on a shard without one text value: that shard fails by name (an empty
    part and exit 0 hid it), the good shard's part is written and read as before."""
    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 1)
    pq.write_table(pa.table({"text": [1, 2, 3], "id": [7, 8, 9]}), data / "z.parquet")
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet", "--out", str(out)]
    assert main([*args, "--skip-bad-rows"]) == 1
    assert "z.parquet: ValueError: every one of its 3 rows is bad" in capsys.readouterr().err
    assert not (out / "part-00001.parquet").exists()
    import pyarrow.dataset as ds

    assert ds.dataset(sorted(map(str, out.glob("part-*.parquet")))).to_table().num_rows == 20


def test_an_input_rewritten_in_place_is_not_taken_as_scored(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 2)
    args = ["score", "--rater", str(folder), "--data", str(data), "--quiet", "--out", str(out)]
    assert main(args) == 0
    with open(data / "s1.jsonl", "a") as f:
        f.write(json.dumps({"text": "a row added later", "id": 99}) + "\n")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "s1.jsonl changed since it was scored into part 1" in err
    (out / "part-00001.done").unlink()  # as the message says: then it is scored again
    assert main(args) == 0
    assert pq.read_table(out / "part-00001.parquet").num_rows == 21
    # the same bytes with another modification time (a copy, a touch): still scored
    os.utime(data / "s0.jsonl", ns=(1, 10**18))
    assert main(args) == 0
    # another content of the same size: refused
    text = (data / "s0.jsonl").read_text()
    (data / "s0.jsonl").write_text(text.replace("shard 0", "shard 9"))
    assert main(args) == 2
    assert "s0.jsonl changed since it was scored into part 0" in capsys.readouterr().err


def test_a_bad_batch_size_writes_nothing(tmp_path, capsys):
    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 1)
    args = ["score", "--rater", str(folder), "--data", str(data), "--out", str(out)]
    assert main([*args, "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err and not out.exists()


def test_filter_says_which_recorded_inputs_have_no_part(tmp_path):
    from datarater.scoring.filter_files import filter_files

    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 2)
    (data / "s0.jsonl").write_text("{broken\n")
    assert main(["score", "--rater", str(folder), "--data", str(data), "--quiet",
                 "--out", str(out)]) == 1  # fmt: skip
    with pytest.warns(UserWarning, match="1 recorded input"):
        stats = filter_files(out, tmp_path / "kept", "quantile", 0.5)
    assert stats["unscored_inputs"] == [str((data / "s0.jsonl").resolve())]
    assert stats["rows"] == 20
    # a part whose marker a killed run had not written yet is not read either
    (out / "part-00001.done").rename(tmp_path / "marker")
    with pytest.raises(FileNotFoundError, match="no part"):
        filter_files(out, tmp_path / "kept2", "quantile", 0.5)


def test_a_checkpoints_folder_given_as_a_rater_is_named(tmp_path):
    from datarater.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 7, {"w": torch.ones(1)}, {"step": 7})
    with pytest.raises(FileNotFoundError, match=r"checkpoints folder: .*step-000007"):
        load_rater(tmp_path / "checkpoints")


def test_the_progress_bar_moves_batch_by_batch_in_tokens(tmp_path, capsys, monkeypatch):
    """One large shard still moves the bar: it counts the tokens of each batch as it is
    scored, with documents per second and the shards done beside it."""
    import tqdm

    from datarater.scoring.score import score_files

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.steps = []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    rater, _ = _rater(tmp_path)
    data = tmp_path / "data"
    _jsonl_shards(data, 1, rows=200)
    report = score_files(rater, [str(data)], "text", tmp_path / "out", batch_size=16)
    (bar,) = bars
    assert len(bar.steps) == -(-200 // 16)  # one update per batch of the one shard
    assert sum(bar.steps) == bar.total == bar.n > 0  # in tokens, all of them
    last = capsys.readouterr().err.split("\r")[-1]
    assert "tok/s" in last and "shards=1/1" in last and "100%" in last
    assert report["rows"] == 200


def test_a_jsonl_row_of_another_type_names_the_way_out(tmp_path):
    from datarater.scoring.score import _load_shard

    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x" if i != 5 else 3}) for i in range(9)))
    with pytest.raises(pa.ArrowInvalid, match=r"row 5 .*--skip-bad-rows leaves such rows out"):
        _load_shard(path, "text")
    table, texts, bad = _load_shard(path, "text", skip_bad_rows=True)
    assert bad == 1 and len(texts) == table.num_rows == 8


def test_ranks_set_by_hand_without_a_rendezvous_just_split_the_shards(tmp_path, monkeypatch):
    _, folder = _rater(tmp_path)
    data, out = tmp_path / "data", tmp_path / "scored"
    _jsonl_shards(data, 3)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["score", "--rater", str(folder), "--data", str(data), "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.done")) == ["part-00001.done"]


def test_an_all_bad_shard_of_another_column_type_and_large_strings(tmp_path):
    """An all-bad shard's text column becomes an empty string column whatever its type (a
    list here); a large_string column with one bad row stays large_string, like its other
    parts."""
    from datarater.scoring.score import _load_shard

    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"text": [[1], [2]]}), lists)
    table, texts, bad = _load_shard(lists, "text", skip_bad_rows=True)
    assert bad == 2 and table.num_rows == 0 and table.schema.field("text").type == pa.string()
    large = tmp_path / "large.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", None, "c"], pa.large_string())}), large)
    table, texts, bad = _load_shard(large, "text", skip_bad_rows=True)
    assert bad == 1 and texts == ["a", "c"] and table.schema.field("text").type == pa.large_string()
