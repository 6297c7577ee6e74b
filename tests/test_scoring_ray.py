"""The thin Ray Data path: a batch scorer (checked without Ray) and ``score_ray`` on Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from datarater.scoring.ray_data import RaterScorer, score_ray
from datarater.scoring.score import SCORE_COLUMN, score_texts

from .test_scoring import _rater

TEXTS = ["one", "two two", "three three three", "x" * 90, "a rather longer document " * 5]


@pytest.mark.parametrize("aggregate", ["truncate", "token_weighted"])
def test_batch_scorer_equals_score_texts_for_every_batch_format(tmp_path, aggregate):
    rater, folder = _rater(tmp_path)
    expected = score_texts(rater, TEXTS, aggregate=aggregate)
    scorer = RaterScorer(folder, aggregate=aggregate, batch_size=2)
    table = pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))})
    out = scorer(table)
    assert out.column_names == ["text", "id", SCORE_COLUMN]
    assert out.column(SCORE_COLUMN).type == pa.float32()
    torch.testing.assert_close(
        torch.tensor(out.column(SCORE_COLUMN).to_pylist()), expected, rtol=1e-5, atol=1e-6
    )
    columns = {"text": list(TEXTS), "id": list(range(len(TEXTS)))}
    got = scorer(columns)
    assert SCORE_COLUMN not in columns  # the caller's dict is left alone
    torch.testing.assert_close(torch.tensor(got[SCORE_COLUMN]), expected, rtol=1e-5, atol=1e-6)
    frame = scorer(table.to_pandas())
    torch.testing.assert_close(
        torch.tensor(frame[SCORE_COLUMN].to_numpy()), expected, rtol=1e-5, atol=1e-6
    )


def test_batch_scorer_keeps_its_precision_and_its_prepared_rater(tmp_path):
    rater, folder = _rater(tmp_path)
    scorer = RaterScorer(folder, precision="bf16")
    prepared = scorer.rater
    got = scorer(pa.table({"text": TEXTS})).column(SCORE_COLUMN).to_pylist()
    assert scorer.rater is prepared and next(prepared.parameters()).dtype == torch.bfloat16
    want = score_texts(rater, TEXTS, precision="bf16")
    torch.testing.assert_close(torch.tensor(got), want)
    assert not torch.allclose(want, score_texts(rater, TEXTS), rtol=1e-6, atol=0)  # bf16 it was


def test_batch_scorer_names_bad_input(tmp_path):
    rater, _ = _rater(tmp_path)
    scorer = RaterScorer(rater)  # a module works as well as a folder
    with pytest.raises(ValueError, match=r"no column 'text' in the batch \(columns: \['body'\]\)"):
        scorer(pa.table({"body": ["x"]}))
    with pytest.raises(ValueError, match="row 1 of 'text' is not text: 7"):
        scorer({"text": ["fine", 7]})
    with pytest.raises(FileNotFoundError):
        RaterScorer(tmp_path / "nowhere")
    frame = pa.table({"text": ["a", None, "c"], "k": [1, 2, 3]}).to_pandas()
    frame.index = [1000, 1001, 1002]  # a batch's own row labels name the row
    with pytest.raises(ValueError, match="row 1001 of 'text' is not text: (None|nan)"):
        scorer(frame)
    lenient = RaterScorer(rater, skip_bad_rows=True)
    for batch in (frame, pa.Table.from_pandas(frame), {"text": ["a", None, "c"], "k": [1, 2, 3]}):
        out = lenient(batch)
        k = out["k"].to_pylist() if isinstance(out, pa.Table) else list(out["k"])
        assert k == [1, 3] and len(out[SCORE_COLUMN]) == 2
    nothing = lenient(pa.table({"text": pa.array([None, None], pa.string())}))
    assert nothing.num_rows == 0 and SCORE_COLUMN in nothing.column_names


@pytest.mark.slow
def test_score_ray_scores_every_row_once(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")  # ray.data.* below

    rater, folder = _rater(tmp_path)
    texts = [f"document {i} " * (1 + i % 7) for i in range(40)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(texts)])
        scored = score_ray(ds, folder, rows_per_batch=16, batch_size=8)
        scored.write_parquet(str(tmp_path / "out"))
        rows = sorted(ray.data.read_parquet(str(tmp_path / "out")).take_all(), key=lambda r: r["i"])
    finally:
        ray.shutdown()
    assert [r["i"] for r in rows] == list(range(len(texts)))
    got = torch.tensor([r[SCORE_COLUMN] for r in rows])
    torch.testing.assert_close(got, score_texts(rater, texts), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="concurrency"):
        score_ray(None, folder, concurrency=0)
