"""``datarater filter``: apply a filtering rule to scored parquet shards."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..io import atomic_write, atomic_write_text, remove_stale_temporaries
from ..runs import RunFolder
from .analyze import MISSING
from .filtering import EmpiricalCDF, accept, quantile_keep, topk_groups
from .score import SCORE_COLUMN, _scored_parts, unfinished_inputs

RULES = ("topk", "paccept", "quantile")


def filter_files(
    scored: Path | str,
    out: Path | str,
    rule: str,
    rho: float,
    batch: int = 64,
    seed: int = 0,
    source_column: str | None = None,
    cdf_sample: int = 100_000,
) -> dict:
    """Keep rows of ``scored/part-*.parquet`` by ``rule``; write ``out/part-*.parquet`` and,
    last, ``out/stats.json`` (kept fraction overall and per source): the mark of a finished
    filter, which readers of the folder require."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    parts = _scored_parts(scored)  # finished parts only
    missing = unfinished_inputs(scored)
    if missing:  # filtered all the same (what is kept is kept), but said, and recorded
        warnings.warn(
            f"{scored}: {len(missing)} recorded input(s) have no finished part (failed or not "
            f"yet scored; first: {missing[0]}): their rows are not in this filter",
            stacklevel=2,
        )
    out = Path(out)
    if out.resolve() == Path(scored).resolve():
        raise ValueError(f"--out {out} is the scored folder itself: its shards would be replaced")
    stale = sorted({x.name for x in out.glob("part-*.parquet")} - {p.name for p in parts})
    if stale:  # readers take every part of a folder: old ones would pass for kept rows
        raise ValueError(
            f"{out} holds parts that this run would not replace ({stale[:3]}...): "
            "use a new --out or empty it"
        )
    # Two passes, so that memory holds the scores and one shard, not the corpus: the rule
    # needs every score (a global quantile, groups across shard boundaries), the rows only
    # their own shard's decisions.
    scores = []
    for p in parts:
        names = pq.ParquetFile(p).schema_arrow.names
        for column in (SCORE_COLUMN, source_column):
            if column and column not in names:
                why = " (not written by `datarater score`)" if column == SCORE_COLUMN else ""
                raise ValueError(f"{p}: no {column!r} column{why}")
        column = pq.read_table(p, columns=[SCORE_COLUMN]).column(0)
        part = torch.tensor(column.to_numpy(zero_copy_only=False))
        if not torch.isfinite(part).all():  # nulls read as NaN
            raise ValueError(f"{p}: {int((~torch.isfinite(part)).sum())} scores are missing or NaN")
        scores.append(part)
    everything = torch.cat(scores)
    if len(everything) == 0:
        raise ValueError(f"{scored}: the scored parts hold no rows")
    RunFolder.claim(out, "filter")  # one writer, and never a folder of another kind
    remove_stale_temporaries(out)  # parts a killed run was writing
    # stats.json marks a finished filter: gone while parts are replaced, so that a run stopped
    # half-way (old and new parts side by side) is not read as either run's rows
    (out / "stats.json").unlink(missing_ok=True)
    if rule == "quantile":
        keep_all = quantile_keep(everything, rho)
        keeps = list(keep_all.split([len(s) for s in scores]))
    elif rule == "topk":
        keep_all = topk_groups(everything, rho, batch)  # groups in stream order, across shards
        keeps = list(keep_all.split([len(s) for s in scores]))
    else:
        gen = torch.Generator().manual_seed(seed)
        sample = everything[torch.randperm(len(everything), generator=gen)[:cdf_sample]]
        cdf, keeps = EmpiricalCDF(sample), []
        for s, p in zip(scores, parts):  # each shard on its own: row ids are (shard, row)
            ids = [f"{p.name}:{i}" for i in range(len(s))]
            keeps.append(accept(s, cdf, rho, batch, ids, seed))
    kept_by, total_by = Counter(), Counter()
    for p, k in zip(parts, keeps):
        t = pq.read_table(p)
        if source_column:
            src = [MISSING if x is None else str(x) for x in t.column(source_column).to_pylist()]
            total_by.update(src)
            kept_by.update(x for x, keep in zip(src, k.tolist()) if keep)
        kept = t.filter(pa.array(k.numpy()))
        atomic_write(out / p.name, lambda tmp, kept=kept: pq.write_table(kept, tmp))
    n, k = len(everything), int(sum(int(x.sum()) for x in keeps))
    stats = {"rule": rule, "rho": rho, "rows": n, "kept": k, "kept_fraction": k / n}
    if missing:
        stats["unscored_inputs"] = missing
    if source_column:
        stats["kept_fraction_by_source"] = {s: kept_by[s] / total_by[s] for s in sorted(total_by)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    return stats
