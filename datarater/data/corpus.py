"""Reading a corpus: jsonl, parquet, a folder of text files, or a saved Hugging Face dataset.

Every reader yields documents as ``str`` (from a text column) and counts what it had to skip,
so that nothing is dropped silently: ``read_documents`` returns the texts and a ``ReadReport``.
A file's format comes from its name; compressed jsonl and text (``.gz``, ``.bz2``, ``.zst``,
``.lz4``: what crawls such as FineWeb ship) are read through pyarrow's codecs.
"""

from __future__ import annotations

import io
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


FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # one JSON object per line, as Hugging Face's to_json writes
    ".parquet": "parquet",
    ".arrow": "arrow",  # the shards of datasets' save_to_disk (Arrow IPC)
    ".txt": "text",
    ".md": "text",
}
# pyarrow's codecs, by file suffix (any case: pyarrow's own detection is case-sensitive)
CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
COMPRESSIONS = tuple(CODECS)


def inner_suffix(path: Path | str) -> str:
    """The file's suffix once a compression suffix is looked through, lower case
    (``a.JSON.GZ`` -> ``.json``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def file_format(path: Path | str) -> str | None:
    """``"jsonl"``, ``"parquet"``, ``"arrow"`` or ``"text"`` from the file's name, looking
    through a compression suffix (``a.jsonl.gz`` is jsonl); None for anything else. Parquet
    and Arrow files compress inside, so a compressed one is not recognised."""
    kind = FORMATS.get(inner_suffix(path))
    compressed = Path(path).suffix.lower() in COMPRESSIONS
    return None if compressed and kind in ("parquet", "arrow") else kind


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed when its name ends in a compression suffix."""
    codec = CODECS.get(path.suffix.lower())
    if codec is not None:
        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(str(path), compression=codec))
    return open(path, "rb")


def read_arrow(path: Path):
    """A ``pyarrow.Table`` from an Arrow IPC file: the stream format that ``save_to_disk``
    writes, or the random-access file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow shards, in order, of a folder written by ``datasets.Dataset.save_to_disk``;
    None when the folder is not one. A ``DatasetDict`` folder is an error that names its
    splits: which split to read is the caller's choice, not a guess."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        first = folder / (splits[0] if splits else "train")
        raise CorpusError(
            f"{folder}: a saved DatasetDict with splits {splits}; pass one split's folder, "
            f"e.g. {first}"
        )
    state = folder / "state.json"
    if not (state.exists() and (folder / "dataset_info.json").exists()):
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{state}: not a saved dataset's state file ({e!r})") from e
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CorpusError(f"{folder}: the saved dataset lacks its shards {missing}")
    return files


def _files(path: Path, formats: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) in formats)
        if not files:
            raise CorpusError(f"{path}: no {'/'.join(formats)} files in this folder")
        return files
    return [path]


def _jsonl(path: Path, column: str, report: ReadReport) -> Iterator[object]:
    try:
        yield from _jsonl_rows(path, column, report)
    except OSError as e:  # a truncated or corrupt compressed file
        raise CorpusError(f"{path}: cannot be read to the end ({e})") from e


def _encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (tokenizers refuse it otherwise)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_rows(path: Path, column: str, report: ReadReport) -> Iterator[object]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # (a byte-order mark before the first row is not part of it)
                row = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
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


def _arrow(path: Path, column: str) -> Iterator[object]:
    try:
        table = read_arrow(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable Arrow file ({e})") from e
    if column not in table.column_names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {table.column_names})")
    yield from table.column(column).to_pylist()


def _text_file(path: Path, report: ReadReport) -> Iterator[object]:
    try:
        with open_binary(path) as f:
            raw = f.read()
    except OSError as e:
        raise CorpusError(f"{path}: cannot be read ({e})") from e
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        report.skip("invalid UTF-8, decoded with replacement characters")
        yield raw.decode("utf-8", errors="replace")


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
    saved = saved_dataset_files(path) if path.is_dir() else None
    if saved is not None:  # read as Arrow: no need for the datasets package
        for f in saved:
            report.files += 1
            yield from _arrow(f, column)
        return
    files = _files(path, ("jsonl", "parquet", "arrow", "text"))
    for f in files:
        report.files += 1
        if f.stat().st_size == 0:
            report.skip("empty file")
            continue
        kind = file_format(f)
        if kind == "jsonl":
            yield from _jsonl(f, column, report)
        elif kind == "parquet":
            yield from _parquet(f, column, report)
        elif kind == "arrow":
            yield from _arrow(f, column)
        else:  # text, and a single file named on purpose whatever its suffix
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
        elif not _encodable(value):  # a lone surrogate (JSON allows "\ud83d"): no UTF-8
            report.skip("unpaired surrogate")
        else:
            docs.append(value)
    report.kept = len(docs)
    if not docs:
        raise CorpusError(f"{source}: no usable documents ({report.summary()})")
    if report.skipped:
        warnings.warn(f"{source}: {report.summary()}", stacklevel=2)
    return docs, report
