"""Reading a corpus: jsonl, parquet, a folder of text files, or a saved Hugging Face dataset.

Every reader yields documents as ``str`` (from a text column) and counts what it had to skip,
so that nothing is dropped silently: ``read_documents`` returns the texts and a ``ReadReport``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class CorpusError(ValueError):
    """A corpus that cannot be read as asked (missing file or column, nothing usable)."""


@dataclass
class ReadReport:
    """What reading skipped, by reason, and how much it kept."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    files: int = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        parts = [f"{self.kept} documents from {self.files} file(s)"]
        parts += [f"skipped {n} ({why})" for why, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise CorpusError(f"{path}: no {'/'.join(suffixes)} files in this folder")
        return files
    return [path]


def _jsonl(path: Path, column: str, report: ReadReport) -> Iterator[object]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.skip("invalid UTF-8")
                continue
            except json.JSONDecodeError:
                report.skip("malformed JSON line")
                continue
            if not isinstance(row, dict) or column not in row:
                if lineno == 1:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise CorpusError(f"{path}: no column {column!r} (first row has {keys})")
                report.skip(f"row without {column!r}")
                continue
            yield row[column]


def _parquet(path: Path, column: str, report: ReadReport) -> Iterator[object]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
    if column not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=[column]):
        yield from batch.column(0).to_pylist()


def _text_file(path: Path, report: ReadReport) -> Iterator[object]:
    raw = path.read_bytes()
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        report.skip("invalid UTF-8, decoded with replacement characters")
        yield raw.decode("utf-8", errors="replace")


def _hf_dataset(path: Path, column: str) -> Iterator[object]:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            f"{path}: a saved Hugging Face dataset needs `pip install datasets`"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if column not in ds.column_names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {ds.column_names})")
    yield from ds[column]


def iter_raw(source, column: str, report: ReadReport) -> Iterator[object]:
    """Raw values of ``column`` from a path (file or folder) or an in-memory dataset object."""
    if not isinstance(source, (str, Path)):  # a datasets.Dataset or any mapping of columns
        names = getattr(source, "column_names", None) or list(getattr(source, "keys", list)())
        if column not in names:
            raise CorpusError(f"the dataset has no column {column!r} (columns: {names})")
        report.files += 1
        yield from source[column]
        return
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder")
    if path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")
    ):
        report.files += 1
        yield from _hf_dataset(path, column)
        return
    files = _files(path, (".jsonl", ".json", ".parquet", ".txt", ".md"))
    for f in files:
        report.files += 1
        if f.stat().st_size == 0:
            report.skip("empty file")
            continue
        if f.suffix in (".jsonl", ".json"):
            yield from _jsonl(f, column, report)
        elif f.suffix == ".parquet":
            yield from _parquet(f, column, report)
        else:
            yield from _text_file(f, report)


def read_documents(
    source, column: str = "text", min_chars: int = 1
) -> tuple[list[str], ReadReport]:
    """All non-empty text documents of a corpus, and a report of what was skipped and why."""
    report = ReadReport()
    docs: list[str] = []
    for value in iter_raw(source, column, report):
        if value is None:
            report.skip("null value")
        elif not isinstance(value, str):
            report.skip(f"non-text value ({type(value).__name__})")
        elif len(value.strip()) < min_chars:
            report.skip("empty document")
        else:
            docs.append(value)
    report.kept = len(docs)
    if not docs:
        raise CorpusError(f"{source}: no usable documents ({report.summary()})")
    if report.skipped:
        warnings.warn(f"{source}: {report.summary()}", stacklevel=2)
    return docs, report
