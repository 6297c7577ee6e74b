"""Scoring a Ray Data dataset: the thin path for CPU or mixed clusters.

``datarater score`` under torchrun fits GPU nodes: one process per GPU, input shards dealt out
by rank, each output shard resumable. Where the workers are CPUs, or a mix, Ray Data already
reads, splits, schedules and writes; all it needs from datarater is a function that scores a
batch. :class:`RaterScorer` is that function (a callable class, so each Ray actor loads and
prepares the rater once), and :func:`score_ray` wires it into ``Dataset.map_batches``.

Ray is optional (``pip install "datarater[ray]"``); nothing here imports it, so
:class:`RaterScorer` also scores plain pyarrow tables, pandas frames or dicts of columns.
Ray's writes are not resumable shard by shard: for runs that must survive a crash without
redoing work, use ``datarater score``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .score import (
    SCORE_COLUMN,
    check_tokenizer,
    padding_id,
    score_texts,
    scoring_copy,
    text_rows,
)


class RaterScorer:
    """Adds ``datarater_score`` to a batch of rows (a ``pyarrow.Table``, a pandas
    ``DataFrame`` or a dict of columns); the other columns pass through unchanged.

    ``rater`` is a folder written by ``datarater train`` (each actor loads its own copy) or a
    rater module; the other arguments are :func:`~datarater.scoring.score.score_texts`'s and
    :func:`~datarater.scoring.score.scoring_copy`'s. ``device`` defaults to a GPU when the
    actor was given one, else the CPU.
    """

    def __init__(
        self,
        rater,
        text_column: str = "text",
        aggregate: str = "truncate",
        batch_size: int = 64,
        device: str | None = None,
        precision: str = "auto",
        tokenizer=None,
        skip_bad_rows: bool = False,
    ) -> None:
        if isinstance(rater, (str, Path)):
            from ..training import load_rater

            rater = load_rater(rater)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = check_tokenizer(rater, tokenizer)
        pad = padding_id(rater, self.tokenizer)
        self.rater = scoring_copy(rater, device, pad, precision)  # once per actor
        self.text_column, self.aggregate, self.batch_size = text_column, aggregate, batch_size
        self.precision = precision  # the prepared copy's: score_texts then uses it as it is
        self.skip_bad_rows = skip_bad_rows

    def __call__(self, batch):
        batch, texts = self._texts(batch)
        scores = score_texts(
            self.rater,
            texts,
            self.tokenizer,
            batch_size=self.batch_size,
            aggregate=self.aggregate,
            precision=self.precision,
        ).numpy()
        if hasattr(batch, "append_column"):  # pyarrow.Table
            import pyarrow as pa

            return batch.append_column(SCORE_COLUMN, pa.array(scores, pa.float32()))
        batch = batch.copy()  # a DataFrame or a dict: the caller's object is left as it was
        batch[SCORE_COLUMN] = scores
        return batch

    def _texts(self, batch):
        """The batch (its rows without text left out, with ``skip_bad_rows``) and its texts."""
        names = batch.column_names if hasattr(batch, "column_names") else list(batch.keys())
        if self.text_column not in names:
            raise ValueError(f"no column {self.text_column!r} in the batch (columns: {names})")
        column = batch[self.text_column]
        texts = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
        labels = list(batch.index) if hasattr(batch, "iloc") else None  # a DataFrame's own
        good = text_rows(texts, self.text_column, self.skip_bad_rows, labels)
        if len(good) == len(texts):
            return batch, texts
        if hasattr(batch, "iloc"):  # a DataFrame
            batch = batch.iloc[good]
        elif hasattr(batch, "take"):  # a pyarrow.Table (typed indices: [] has no type)
            import pyarrow as pa

            batch = batch.take(pa.array(good, pa.int64()))
        else:  # a dict of columns: numpy arrays stay arrays
            batch = {
                k: v[good] if hasattr(v, "shape") else [v[i] for i in good]
                for k, v in batch.items()
            }
        return batch, [texts[i] for i in good]


def score_ray(
    dataset,
    rater: str | Path,
    text_column: str = "text",
    *,
    concurrency: int = 1,
    num_gpus: float = 0,
    rows_per_batch: int = 1024,
    **scoring,
):
    """``dataset`` (a ``ray.data.Dataset``) with a ``datarater_score`` column, scored lazily
    by ``concurrency`` actors holding one rater each (``num_gpus`` per actor: 1 on GPU
    nodes, 0 on CPUs). ``rows_per_batch`` is how many rows an actor scores per call; the
    rater's own batches are ``scoring["batch_size"]``. Further keywords go to
    :class:`RaterScorer`. Write the result with Ray (``.write_parquet(folder)``)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return dataset.map_batches(
        RaterScorer,
        fn_constructor_kwargs=dict(rater=str(rater), text_column=text_column, **scoring),
        batch_format="pyarrow",
        batch_size=rows_per_batch,
        concurrency=concurrency,
        num_gpus=num_gpus,
    )
