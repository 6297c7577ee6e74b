"""Scoring documents with a trained rater, in memory or shard by shard on disk.

Shards are written atomically with a completion marker, so a rerun after a crash skips the
finished shards and redoes the others: every input row appears exactly once in the output.
Under torchrun each rank takes the shards ``i % world == rank``.
"""

from __future__ import annotations

import glob
import json
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from ..data.corpus import (
    file_format,
    inner_suffix,
    open_binary,
    read_arrow,
    saved_dataset_files,
)
from ..data.tokens import encode_all, get_tokenizer
from ..io import atomic_write, atomic_write_text, digest, remove_stale_temporaries
from ..models.transformer import ATTENTION_BACKENDS, set_inference_attention
from ..runs import RunFolder, kind_of

AGGREGATIONS = ("truncate", "mean", "token_weighted")
SCORE_COLUMN = "datarater_score"


PRECISIONS = ("auto", "bf16", "fp32", "fp8")
# Under ``compile=True`` a batch of longest window w runs at width ``bucket_width(w)``: powers
# of two from 64 to 256, then multiples of 256, capped at the context (10 widths at 2048).
# Few widths mean few compilations; the padding they add is masked and costs only compute.
_BUCKET_MIN, _BUCKET_STEP = 64, 256


def bucket_width(width: int, context: int) -> int:
    """The padded width of a batch whose longest window has ``width`` tokens (``compile``)."""
    if width < 1:
        raise ValueError(f"a batch width must be >= 1, got {width}")
    if width <= _BUCKET_STEP:
        bucket = max(_BUCKET_MIN, 1 << (width - 1).bit_length())
    else:
        bucket = -(-width // _BUCKET_STEP) * _BUCKET_STEP
    return min(bucket, max(context, width))


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def scoring_copy(
    rater,
    device: str | torch.device | None,
    pad_id: int,
    precision: str = "auto",
    compile: bool = False,
    attention: str = "sdpa",
):
    """The rater as scoring runs it: on ``device`` (default: where it is), in eval mode, with
    padding masked, at ``precision``: ``"auto"`` (bf16 on GPUs, float32 elsewhere), ``"bf16"``,
    ``"fp32"``, or ``"fp8"`` (the blocks' linear layers in FP8, see
    :mod:`datarater.models.fp8`; the rest in bf16 on GPUs and float32 on CPUs, where FP8 is a
    slow reference path). ``compile=True`` compiles the forward for fixed shapes (scoring then
    pads batches to a few widths and a constant row count). The caller's module is copied,
    not changed, when anything differs (to score the same rater many times, prepare it once:
    a prepared copy, which records its options in ``scoring_options``, is returned as it
    is; with ``compile`` a fresh copy would compile again). ``attention`` is ``"sdpa"``
    (PyTorch's fused attention) or ``"triton"`` (:mod:`datarater.kernels.attention`, GPUs
    only)."""
    import copy

    from ..models.fp8 import check_fp8_device, float8_layers, to_float8

    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if attention not in ATTENTION_BACKENDS:  # before any copy is made
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    p = next(rater.parameters(), None)
    if p is None:
        raise ValueError("the rater has no parameters")
    device = p.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = _resolve_precision(precision, device)
    fp8 = precision == "fp8"
    if fp8:
        check_fp8_device(device)
    elif float8_layers(rater):
        raise ValueError(
            f"the rater's linear layers are already FP8; score it with precision='fp8', not "
            f"{precision!r} (or pass the unconverted rater)"
        )
    if compile and not hasattr(rater, "pad_id"):
        raise ValueError(
            "compile=True pads batches to fixed shapes, which needs a rater that masks padding "
            "(a `pad_id` attribute, as datarater's Rater has)"
        )
    # fp8 keeps its other layers in bf16 on GPUs; on CPUs, float32 isolates the quantisation
    on_cpu_fp8 = fp8 and device.type != "cuda"
    dtype = torch.float32 if precision == "fp32" or on_cpu_fp8 else torch.bfloat16
    if attention == "triton":
        from ..kernels.triton_attention import HEAD_SIZES

        if device.type != "cuda":
            raise ValueError(
                f"attention='triton' needs a GPU and scoring runs on {device}: "
                "leave attention at 'sdpa' there"
            )
        cfg = getattr(rater, "cfg", None)
        head = None if cfg is None else cfg.d_model // cfg.n_heads
        if head is not None and head not in HEAD_SIZES:
            raise ValueError(
                f"attention='triton' takes head sizes {HEAD_SIZES}; this rater's is {head} "
                f"(d_model {cfg.d_model} / {cfg.n_heads} heads): use 'sdpa'"
            )
    wanted = (precision, compile, attention)
    marker = getattr(rater, "scoring_options", None)
    plain = not fp8 and not compile and attention == "sdpa"
    ready = (
        p.dtype == dtype
        and p.device == device
        and not rater.training
        and getattr(rater, "pad_id", 0) is not None
        and (marker == wanted or (marker is None and plain))
        and (not compile or getattr(rater, "_compiled_call_impl", None) is not None)
    )
    if ready:
        return rater
    rater = copy.deepcopy(rater).to(device=device, dtype=dtype).eval()
    if not compile and getattr(rater, "_compiled_call_impl", None) is not None:
        rater._compiled_call_impl = None  # a copy of a compiled copy: run it eagerly as asked
    if getattr(rater, "pad_id", None) is None and hasattr(rater, "pad_id"):
        rater.pad_id = pad_id  # never let padding change another document's score
    set_inference_attention(rater, attention)  # the copy never trains
    if fp8:
        rater = to_float8(rater, inplace=True)  # after the cast: quantises the cast weights
    if compile:
        rater.compile(dynamic=False)  # in place on the copy; one graph per batch shape
    rater.scoring_options = wanted
    return rater


def check_tokenizer(rater, tokenizer):
    """The tokenizer to score with (default: the one the rater was trained with), checked."""
    tokenizer = tokenizer or get_tokenizer(getattr(rater, "tokenizer", None))
    if tokenizer.vocab_size != rater.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer ({tokenizer.name}, {tokenizer.vocab_size} ids) does not fit the "
            f"rater's vocabulary of {rater.cfg.vocab_size}"
        )
    return tokenizer


def padding_id(rater, tokenizer) -> int:
    """The rater's padding id, else the tokenizer's."""
    pad = getattr(rater, "pad_id", None)
    return tokenizer.pad_id if pad is None else pad


def score_texts(
    rater,
    texts: Sequence[str],
    tokenizer=None,
    seq_len: int | None = None,
    batch_size: int = 64,
    aggregate: str = "truncate",
    device: str | torch.device | None = None,
    stats: dict | None = None,
    precision: str = "auto",
    compile: bool = False,
    attention: str = "sdpa",
) -> Tensor:
    """One float32 score per text. Long texts are truncated to the rater's context, or split
    into windows whose scores are averaged (``"mean"``) or averaged by token count
    (``"token_weighted"``); a last window of a single token is folded away unless it is the
    text's only one. Batches are formed from texts of similar length. ``device`` defaults to
    the rater's; ``precision``, ``compile`` and ``attention`` are :func:`scoring_copy`'s."""
    texts = _text_list(texts)
    tokenizer = check_tokenizer(rater, tokenizer)
    windows = _windows(texts, tokenizer, seq_len or rater.cfg.max_seq_len, aggregate)
    if stats is not None:  # what was scored, for throughput figures
        stats["tokens"] = stats.get("tokens", 0) + sum(len(w[1]) for w in windows)
    pad = padding_id(rater, tokenizer)
    rater = scoring_copy(rater, device, pad, precision, compile, attention)
    pending = _launch(rater, windows, batch_size, pad, fixed_shapes=compile)
    return _aggregate(windows, _collect(pending), len(texts), aggregate)


def _text_list(texts) -> list[str]:
    """``texts`` as a list, every item a string (else an error naming the first that is not)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not one string: wrap it in a list")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{bad}] is not text: {texts[bad]!r} ({type(texts[bad]).__name__})")
    return texts


def text_rows(
    texts: Sequence,
    column: str,
    skip_bad_rows: bool,
    labels=None,
    hint: str = "skip_bad_rows=True",
) -> list[int]:
    """Positions of the values that are text. A value that is not is an error naming its row
    (``labels[i]``, else i) and how many there are, unless ``skip_bad_rows``, which leaves
    such rows out; ``hint`` is how the caller's user switches that on."""
    good = [i for i, t in enumerate(texts) if isinstance(t, str)]
    if len(good) < len(texts) and not skip_bad_rows:
        first = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        label = first if labels is None else labels[first]
        raise ValueError(
            f"row {label} of {column!r} is not text: {texts[first]!r} "
            f"({type(texts[first]).__name__}), one of {len(texts) - len(good)} such rows; "
            f"{hint} leaves them out"
        )
    return good


def _windows(
    texts: Sequence[str], tokenizer, seq_len: int, aggregate: str
) -> list[tuple[int, list[int]]]:
    """(text index, tokens) of every window to score."""
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    windows: list[tuple[int, list[int]]] = []
    for i, toks in enumerate(encode_all(tokenizer, texts)):
        pieces = (
            [toks[:seq_len]]
            if aggregate == "truncate"
            else [toks[j : j + seq_len] for j in range(0, len(toks), seq_len)]
        )
        if len(pieces) > 1 and len(pieces[-1]) < 2:  # the rater never trains on such windows
            pieces.pop()
        windows.extend((i, p) for p in pieces)
    return windows


def _aggregate(windows, win_scores: Tensor, n_texts: int, aggregate: str) -> Tensor:
    """Window scores to text scores (an ordinary tensor, outside inference mode)."""
    owner = torch.tensor([w[0] for w in windows], dtype=torch.long)
    weight = torch.tensor(
        [len(w[1]) if aggregate == "token_weighted" else 1.0 for w in windows], dtype=torch.float64
    )
    total = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, owner, weight * win_scores)
    count = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, owner, weight)
    return (total / count.clamp_min(1e-30)).float()


def _launch(
    rater, windows, batch_size: int, pad: int, fixed_shapes: bool = False, on_batch=None
) -> tuple:
    """Queue the scoring of token windows, batched by length, without waiting for it: on a
    GPU the scores come back through pinned memory behind an event, so the caller can prepare
    (or write) other work meanwhile. ``_collect`` waits for them.

    ``fixed_shapes`` (what a compiled rater needs, so that it compiles a few graphs rather
    than one per batch) pads every batch to ``batch_size`` rows and its width to
    :func:`bucket_width`. The extra columns are padding, which the rater masks; the extra
    rows copy the batch's last row, so they add no padding of their own, and their scores
    are dropped. ``on_batch(tokens)`` is told of each batch as it is queued (a progress bar)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(rater.parameters()).device
    order = sorted(range(len(windows)), key=lambda w: len(windows[w][1]))
    on_gpu = device.type == "cuda"
    context = getattr(getattr(rater, "cfg", None), "max_seq_len", 0)
    pieces = []  # scores stay on the device until the end: no synchronisation per batch
    with torch.inference_mode(), _recompile_room(fixed_shapes):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lengths = [len(windows[w][1]) for w in idx]
            width, n_rows = max(lengths), len(idx)
            if fixed_shapes:
                width, n_rows = bucket_width(width, context), batch_size
            ids = torch.full((n_rows, width), pad, dtype=torch.long, pin_memory=on_gpu)
            rows = ids.numpy()  # filling through numpy is ~8x faster than torch.tensor(list)
            for r, w in enumerate(idx):
                rows[r, : lengths[r]] = windows[w][1]
            rows[len(idx) :] = rows[len(idx) - 1]  # filler rows (fixed shapes only)
            # a batch without padding needs no mask, which lets flash attention run on GPUs
            padded = min(lengths) < width
            out = rater(ids.to(device, non_blocking=True), padded=padded)
            pieces.append(out[: len(idx)].float())
            if on_batch is not None:
                on_batch(sum(lengths))
        scores = torch.cat(pieces) if pieces else torch.empty(0)
        host = torch.empty(len(order), dtype=torch.float32, pin_memory=on_gpu)
        host.copy_(scores, non_blocking=on_gpu)
    event = None
    if on_gpu:  # on the rater's device's stream, which need not be the current device
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    return order, host, event


def _recompile_room(compiled: bool):
    """Room for every (width, mask) graph a compiled rater needs: dynamo falls back to eager
    after ``recompile_limit`` (8 by default) graphs of one function."""
    import contextlib

    if not compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    limit = max(64, torch._dynamo.config.recompile_limit)
    return torch._dynamo.config.patch(recompile_limit=limit)


def _collect(pending: tuple) -> Tensor:
    """The window scores of a ``_launch``, in window order (waits for the device)."""
    order, host, event = pending
    if event is not None:
        event.synchronize()
    out = torch.empty(len(order), dtype=torch.float32)  # an ordinary tensor
    out[order] = host
    return out


# What a folder given to ``score`` contributes: jsonl (also compressed), parquet, Arrow shards.
# A ``.json`` file is read when named, not picked from a folder, where it is more often
# metadata than data.
SHARD_FORMATS = ("jsonl", "parquet", "arrow")


def _expand(inputs: Sequence[str], exclude: Path | None = None) -> list[Path]:
    """Input files in order, each once; nothing under ``exclude`` (the output folder). A
    folder written by ``datasets``' ``save_to_disk`` gives its Arrow shards."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        saved = saved_dataset_files(p) if p.is_dir() else None
        if saved is not None:
            files += saved
        elif p.is_dir():
            files += sorted(
                x
                for x in p.rglob("*")
                if x.is_file() and file_format(x) in SHARD_FORMATS and inner_suffix(x) != ".json"
            )
        else:
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"{item}: no such file (or no file matches the glob)")
            files += [Path(m) for m in matched]
    seen, unique, inside = set(), [], 0
    skip = None if exclude is None else exclude.resolve()
    for f in files:
        key = f.resolve()
        if skip is not None and key.is_relative_to(skip):
            inside += 1
        elif key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:  # a run that scores nothing is a mistake, not a success
        if inside:
            raise ValueError(
                f"all {inside} input files are under the output folder {exclude}, whose files "
                "are never inputs: choose an --out outside the inputs"
            )
        raise FileNotFoundError(
            f"no input files in {list(inputs)}: score reads jsonl (also .gz/.bz2/.zst/.lz4), "
            "parquet and Arrow shards and saved Hugging Face datasets (a folder of text files "
            "is a corpus for `datarater train`, not a set of shards)"
        )
    return unique


def run_settings(
    rater, tokenizer, text_column: str, aggregate: str, precision: str, device=None
) -> dict:
    """What the scores of a ``score_files`` run depend on: its output folder records them so
    that a rerun with another rater or other settings cannot mix two kinds of scores.
    ``precision="auto"`` is recorded as what it means on ``device`` (bf16 or fp32)."""
    name = str(tokenizer.name)
    if precision == "auto":
        where = torch.device(device) if device is not None else next(rater.parameters()).device
        precision = "bf16" if where.type == "cuda" else "fp32"
    return {
        # values in order: a wrapper around the same rater is the same rater
        "rater_weights": digest(*rater.state_dict().values()),
        "context": rater.cfg.max_seq_len,
        "tokenizer": digest(Path(name)) if Path(name).is_file() else name,
        "text_column": text_column,
        "aggregate": aggregate,
        "precision": precision,
    }


def recorded_settings(folder: Path | str) -> dict:
    """The settings a ``score_files`` folder was scored with (empty if it records none)."""
    return (_manifest(Path(folder)) or {}).get("settings", {})


def _check_run(out: Path, files: list[Path], settings: dict) -> list[Path]:
    """The input behind each part number (``part-i`` is the returned list's item i), and the
    same rater and settings as the run that started the folder.

    The first run records its inputs in order in ``inputs.json``, with what the scores depend
    on. A rerun must list every recorded input (in any order) so that no part is orphaned;
    inputs it adds get the next part numbers, wherever they sort (shards of a growing crawl).
    Settings may change while no shard is finished (a first run that failed on a wrong
    column can be fixed in place); ``skip_bad_rows`` is not one of them (it changes no score;
    each shard's marker counts the rows it left out). A recorded input that never finished
    may be dropped (a corrupt shard removed): its part number stays reserved, and its slot in
    the returned list is None. Every rank of a torchrun job derives the same numbering."""
    manifest = out / "inputs.json"
    by_name = {str(f.resolve()): f for f in files}
    before = _manifest(out) or {"inputs": []}
    old = before["inputs"]
    gone = [name for i, name in enumerate(old) if name not in by_name and _finished(out, i)]
    if gone:
        raise ValueError(
            f"{out}: {len(gone)} of the {len(old)} input files of the run that started this "
            f"folder, finished already, are not among the inputs now (first: {gone[0]}); "
            "finish with all of them (new ones may be added), or use a new --out"
        )
    recorded = set(old)
    numbered = old + [name for name in by_name if name not in recorded]
    dropped = [name for name in old if name not in by_name]  # none of them finished
    then = before.get("settings")
    diff = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in settings.items()
            if then is not None and then.get(k) != v]  # fmt: skip
    if diff and any(out.glob("part-*.done")):
        raise ValueError(
            f"{out} was started with another rater or other settings ({'; '.join(diff)}); "
            "finish it with the same ones or use a new --out"
        )
    if then != settings or numbered != old or dropped != before.get("dropped", []):
        record = {"inputs": numbered, "settings": settings}
        if dropped:  # readers need not miss them
            record["dropped"] = dropped
        atomic_write_text(manifest, json.dumps(record, indent=1))
    return [by_name.get(name) for name in numbered]


def _read_table(path: Path):
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise ValueError("empty file")
    kind = file_format(path)
    if kind == "parquet":
        return pq.read_table(path)
    if kind == "arrow":
        return read_arrow(path)
    if kind == "text":
        raise ValueError("a text file is a corpus for `datarater train`, not a shard to score")
    with open_binary(path) as f:  # jsonl, and a file named on purpose whatever its suffix
        return pj.read_json(f)


def _jsonl_table(path: Path, text_column: str):
    """A jsonl shard read row by row, rows without a text value left out, and how many: for
    shards pyarrow refuses whole (a column that changes type, a malformed line). Another
    column whose values still do not share a type is kept as JSON text."""
    import pyarrow as pa

    rows, bad = [], 0
    with open_binary(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # malformed JSON or invalid UTF-8
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get(text_column), str):
                rows.append(row)
            else:
                bad += 1
    if not rows:
        return pa.table({text_column: pa.array([], pa.string())}), bad
    try:
        return pa.Table.from_pylist(rows), bad
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = list(dict.fromkeys(k for row in rows for k in row))
        columns = {}
        for name in names:
            values = [row.get(name) for row in rows]
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns[name] = pa.array(
                    [None if v is None else json.dumps(v) for v in values], pa.string()
                )
        return pa.table(columns), bad


def _load_shard(path: Path, text_column: str, skip_bad_rows: bool = False):
    """The shard's table, its texts and the number of rows left out. Every value of the text
    column must be a string; with ``skip_bad_rows`` the rows whose value is not (or that
    pyarrow cannot parse) are left out and counted instead of failing the shard."""
    import pyarrow as pa

    try:
        table = _read_table(path)
    except pa.ArrowInvalid as e:
        if file_format(path) != "jsonl":
            raise
        if not skip_bad_rows:  # a row pyarrow cannot parse, or of another type than the rest
            raise pa.ArrowInvalid(f"{e} (--skip-bad-rows leaves such rows out)") from e
        table, bad = _jsonl_table(path, text_column)
        return table, table.column(text_column).to_pylist(), bad
    if text_column not in table.column_names:
        raise ValueError(f"no column {text_column!r} (columns: {table.column_names})")
    texts = table.column(text_column).to_pylist()
    good = text_rows(texts, text_column, skip_bad_rows, hint="--skip-bad-rows")
    bad = len(texts) - len(good)
    if bad:
        table = table.take(pa.array(good, pa.int64()))
        texts = [texts[i] for i in good]
        column = table.schema.get_field_index(text_column)
        kind = table.schema.field(column).type
        if not good and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            # every row was bad: a text column of another type would break the readers
            table = table.set_column(column, text_column, pa.array([], pa.string()))
    return table, texts, bad


def score_files(
    rater,
    inputs: Sequence[str],
    text_column: str,
    out: Path | str,
    aggregate: str = "truncate",
    batch_size: int = 64,
    tokenizer=None,
    device: str = "cpu",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    precision: str = "auto",
    compile: bool = False,
    attention: str = "sdpa",
    skip_bad_rows: bool = False,
) -> dict:
    """Score every row of every input shard into ``out/part-NNNNN.parquet`` (all original
    columns plus ``datarater_score``). Returns counts: done, skipped (already finished),
    failed (with the reason per file), and with ``skip_bad_rows`` the rows left out per file
    (rows without a text value, which otherwise fail their shard). ``precision``,
    ``compile`` and ``attention`` are :func:`scoring_copy`'s."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if batch_size < 1:  # before anything is written
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    files = _expand(inputs, exclude=out)
    tokenizer = check_tokenizer(rater, tokenizer)
    pad = padding_id(rater, tokenizer)
    settings = run_settings(rater, tokenizer, text_column, aggregate, precision, device)
    rater = scoring_copy(rater, device, pad, precision, compile, attention)  # once
    RunFolder.claim(out, "score")  # this process's rank writes it: no other writer
    remove_stale_temporaries(out)  # parts a killed run was writing
    files = _check_run(out, files, settings)  # in part order
    report = {"done": 0, "skipped": 0, "failed": {}, "rows": 0, "tokens_per_s": None}
    if None in files:
        report["left_out"] = files.count(None)  # recorded inputs that never finished
    if world > 1:  # each rank prints its own report: say whose (its shards: i % world == rank)
        report = {"rank": rank, "world": world, **report}
    if skip_bad_rows:
        report["bad_rows"] = {}
    t0, tokens = time.perf_counter(), 0
    todo = []
    for i, path in enumerate(files):  # every rank checks every marker: all refuse alike
        if path is None:  # an input left out (it never finished)
            continue
        marker = out / f"part-{i:05d}.done"
        finished = _finished(out, i)
        if finished:
            _check_marker(marker, path, i)
        if i % world != rank:
            continue
        if finished:
            report["skipped"] += 1
        else:
            todo.append((i, path))
    # the bar counts tokens, batch by batch (its total grows as shards are read), with the
    # documents per second and the shards done beside it: a few large shards still move it
    bar = tqdm(
        total=0,
        unit="tok",
        unit_scale=True,
        desc=f"scoring (rank {rank})",
        disable=not progress or not todo,
    )
    # A pipeline: a reader thread loads and tokenises the next shard while this one is
    # scored; a shard's scores are collected and written only after the next shard's batches
    # are queued, so the GPU is not idle while the CPU writes (on the CPU, where a shard is
    # scored when _launch returns, it is written at once: a crash then loses no finished
    # shard). On an error the pending read is cancelled rather than awaited, and the bar closed.
    seq_len = rater.cfg.max_seq_len

    def prepare(path: Path):
        # the file as read (a change during the read shows at a rerun)
        stat = {"input_stat": _stat(path), "input_sha256": digest(path)}
        table, texts, bad = _load_shard(path, text_column, skip_bad_rows)
        if bad and not texts:  # (--skip-bad-rows left out all of it: that is no result)
            raise ValueError(f"every one of its {bad} rows is bad (no text, not a string or "
                             "unparsable): nothing of it is scored")  # fmt: skip
        return table, len(texts), bad, _windows(texts, tokenizer, seq_len, aggregate), stat

    def finish(job) -> None:
        nonlocal tokens
        i, path, table, n_texts, bad, windows, stat, pending = job
        scores = _aggregate(windows, _collect(pending), n_texts, aggregate)
        tokens += sum(len(w[1]) for w in windows)
        column = pa.array(scores.numpy(), pa.float32())
        if SCORE_COLUMN in table.column_names:  # scored before (another rater): replaced
            table = table.set_column(table.column_names.index(SCORE_COLUMN), SCORE_COLUMN, column)
        else:
            table = table.append_column(SCORE_COLUMN, column)
        part = out / f"part-{i:05d}.parquet"
        atomic_write(part, lambda tmp: pq.write_table(table, tmp))
        marker = out / f"part-{i:05d}.done"
        record = {"input": str(path.resolve()), **stat, "rows": table.num_rows}
        if bad:
            record["bad_rows"] = report["bad_rows"][str(path)] = bad
        atomic_write_text(marker, json.dumps(record))
        report["done"] += 1
        report["rows"] += table.num_rows
        dt = time.perf_counter() - t0
        bar.set_postfix(docs_s=f"{report['rows'] / dt:.0f}", shards=f"{report['done']}/{len(todo)}")

    reader = ThreadPoolExecutor(max_workers=1)
    queued = None  # the shard whose scores are on their way
    try:
        ahead = reader.submit(prepare, todo[0][1]) if todo else None
        for k, (i, path) in enumerate(todo):
            loading = ahead
            if k + 1 < len(todo):
                ahead = reader.submit(prepare, todo[k + 1][1])
            try:
                table, n_texts, bad, windows, stat = loading.result()
            except Exception as e:  # noqa: BLE001 - a bad shard is reported, the others go on
                report["failed"][str(path)] = f"{type(e).__name__}: {e}"
                continue
            bar.total += sum(len(w[1]) for w in windows)
            bar.refresh()
            try:
                pending = _launch(rater, windows, batch_size, pad, compile, bar.update)
            except Exception as e:
                if queued is not None:  # the shard already scored is kept before failing
                    try:
                        finish(queued)
                    except Exception as late:  # noqa: BLE001 - the first error is the one raised
                        e.add_note(f"writing the shard scored before also failed: {late!r}")
                raise
            if queued is not None:
                finish(queued)
            queued = (i, path, table, n_texts, bad, windows, stat, pending)
            if pending[2] is None:  # scored already (no device queue): written at once
                finish(queued)
                queued = None
        if queued is not None:
            finish(queued)
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        bar.close()
    report["tokens_per_s"] = tokens / max(1e-9, time.perf_counter() - t0)
    return report


def _stat(path: Path) -> list[int]:
    """What a rerun compares first to tell an input rewritten in place: size and mtime."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _finished(folder: Path, i: int) -> bool:
    """Whether part ``i`` is done: its marker and its part are both there (a part deleted
    under its marker is scored again, and readers do not count it)."""
    stem = folder / f"part-{i:05d}"
    return stem.with_suffix(".done").exists() and stem.with_suffix(".parquet").exists()


def _check_marker(marker: Path, path: Path, i: int) -> None:
    """A finished shard's marker must be this input's, as it was when scored."""
    record = json.loads(marker.read_text())
    if Path(record["input"]).resolve() != path.resolve():
        raise ValueError(f"{marker} was written for another input than {path}")
    then, now = record["input_stat"], _stat(path)
    if then == now:
        return
    if then[0] == now[0] and record.get("input_sha256") == digest(path):
        return  # the same bytes with another mtime: copied, or touched
    raise ValueError(
        f"{path} changed since it was scored into part {i}: remove {marker.name} to score it "
        "again, or use a new --out"
    )


def _manifest(folder: Path) -> dict | None:
    """A ``score_files`` folder's ``inputs.json``."""
    path = folder / "inputs.json"
    return json.loads(path.read_text()) if path.exists() else None


def unfinished_inputs(folder: Path | str) -> list[str]:
    """The inputs a ``score_files`` folder records that have no finished part (failed or not
    yet scored shards; not those a rerun left out): what a reader of the folder lacks."""
    folder = Path(folder)
    record = _manifest(folder) or {"inputs": []}
    dropped = set(record.get("dropped", []))
    return [
        name
        for i, name in enumerate(record["inputs"])
        if name not in dropped and not _finished(folder, i)
    ]


def _scored_parts(folder: Path | str) -> list[Path]:
    """The parts a reader takes: in a ``score_files`` folder only finished ones (a part whose
    marker a killed run had not written yet is redone by the next run); in a filter's, all,
    once the filter has finished (stats.json, written last)."""
    folder = Path(folder)
    if kind_of(folder) == "filter" and not (folder / "stats.json").exists():
        raise FileNotFoundError(
            f"{folder}: a filter stopped before it finished (no stats.json, written last): "
            "run the same `datarater filter` again"
        )
    parts = sorted(folder.glob("part-*.parquet"))
    if _manifest(folder) is not None:
        parts = [p for p in parts if p.with_suffix(".done").exists()]
    if not parts:
        raise FileNotFoundError(f"{folder}: no part-*.parquet files (run `datarater score`)")
    return parts


def count_scored(folder: Path | str) -> int:
    """Rows in the ``part-*.parquet`` files of ``folder``, from their footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in _scored_parts(folder))


def read_scored(
    folder: Path | str,
    columns: Sequence[str],
    text_columns: Sequence[str] = (),
    rows: Sequence[int] | None = None,
) -> dict[str, list]:
    """The named columns of every ``part-*.parquet`` under ``folder`` (written by ``score`` or
    ``filter``), in shard order; ``rows``: only those positions (sorted, in that order), read
    part by part, so that a sample of a large folder costs the sample. A missing column, a
    non-string value in ``text_columns`` or a missing or non-finite score is an error naming
    the shard and the row."""
    import bisect
    import math

    import pyarrow.parquet as pq

    out: dict[str, list] = {c: [] for c in columns}
    start = 0
    for p in _scored_parts(folder):
        f = pq.ParquetFile(p)
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{p}: no column {missing[0]!r} (columns: {f.schema_arrow.names})")
        n, local = f.metadata.num_rows, None
        if rows is not None:
            lo, hi = bisect.bisect_left(rows, start), bisect.bisect_left(rows, start + n)
            local = [r - start for r in rows[lo:hi]]
        start += n
        if local == []:
            continue
        t = f.read(columns=list(dict.fromkeys(columns)))
        if local is not None:
            t = t.take(local)
        for c in columns:
            values = t.column(c).to_pylist()
            if c in text_columns:
                bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
                if bad is not None:
                    row = bad if local is None else local[bad]
                    raise ValueError(f"{p}: row {row} of {c!r} is not text: {values[bad]!r}")
            if c == SCORE_COLUMN:
                bad = next(
                    (i for i, v in enumerate(values) if v is None or not math.isfinite(v)), None
                )
                if bad is not None:
                    row = bad if local is None else local[bad]
                    raise ValueError(f"{p}: row {row} has no finite score ({values[bad]!r})")
            out[c] += values
    return out


def _is_iterable_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def score_dataset(
    rater,
    dataset,
    text_column: str = "text",
    precision: str = "auto",
    compile: bool = False,
    attention: str = "sdpa",
    skip_bad_rows: bool = False,
    **kwargs,
):
    """A Hugging Face ``datasets.Dataset`` with a ``datarater_score`` column added; the other
    arguments are :func:`score_texts`'s. An ``IterableDataset`` is scored lazily, batch by
    batch as it is iterated, with the rater prepared once. A row whose text is missing or not
    a string is an error naming it, or with ``skip_bad_rows`` is left out (with a warning
    that counts them, for a ``Dataset``)."""
    names = dataset.column_names
    if isinstance(names, dict):  # a DatasetDict: {split: columns}
        raise TypeError(
            f"a DatasetDict (splits {sorted(names)}): score one split, e.g. "
            f"score_dataset(rater, dataset[{sorted(names)[0]!r}])"
        )
    if names is not None and text_column not in names:
        raise ValueError(f"the dataset has no column {text_column!r} (columns: {names})")
    if names is not None and SCORE_COLUMN in names:
        raise ValueError(
            f"the dataset already has a {SCORE_COLUMN!r} column; drop it first "
            f"(dataset.remove_columns({SCORE_COLUMN!r}))"
        )
    options = dict(precision=precision, compile=compile, attention=attention)
    if _is_iterable_dataset(dataset):  # scored lazily, as it is iterated
        tokenizer = check_tokenizer(rater, kwargs.pop("tokenizer", None))
        device = kwargs.pop("device", None)
        prepared = scoring_copy(rater, device, padding_id(rater, tokenizer), **options)

        def add_scores(batch: dict, rows: list[int]) -> dict:  # rows: places in the stream
            texts = batch[text_column]
            good = text_rows(texts, text_column, skip_bad_rows, rows)
            if len(good) < len(texts):
                batch = {k: [v[i] for i in good] for k, v in batch.items()}
            scores = score_texts(prepared, batch[text_column], tokenizer, **options, **kwargs)
            return {**batch, SCORE_COLUMN: scores.tolist()}

        return dataset.map(add_scores, batched=True, batch_size=1024, with_indices=True)
    texts = dataset[text_column]
    good = text_rows(texts, text_column, skip_bad_rows)
    if len(good) < len(texts):
        warnings.warn(f"left out {len(texts) - len(good)} rows without text", stacklevel=2)
        dataset, texts = dataset.select(good), [texts[i] for i in good]
    scores = score_texts(rater, texts, **options, **kwargs)
    return dataset.add_column(SCORE_COLUMN, scores.tolist())
