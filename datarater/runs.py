"""Run folders: the one component every long command writes its folder through.

A run folder records, in ``run.json``, the format version that wrote it and its kind (a
training run, a scored folder, a filtered folder, an evaluation, a demo). Claiming one for
writing (:meth:`RunFolder.claim`):

* takes an exclusive lock held for as long as the writer runs (one lock per torchrun rank, so
  a group writes together and a second writer, a second group included, is refused by name);
* refuses a folder of another kind (``filter --out`` onto a scored folder), of another format
  version (with how to redo it), and a folder of files that no datarater of this version
  wrote;
* gives paths that stay inside it (:meth:`RunFolder.inside`): a file of the folder cannot
  point a reader or a writer elsewhere.

Settings and their comparison are the commands' own for now: each names what changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from .io import atomic_write_json, inside

FORMAT = 1  # of run.json and the folders it describes; other versions are refused by name
KINDS = {
    "train": "a training run",
    "score": "a scored folder",
    "filter": "a filtered folder",
    "evaluate": "an evaluation",
    "demo": "a demo",
}
RECORD = "run.json"
_HELD: dict[Path, RunFolder] = {}  # this process's claims, by resolved folder


class RunFolderError(ValueError):
    """A folder this command may not write: another kind, another writer, another format."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _writer() -> dict:
    """Who holds a lock: enough to name them in a refusal."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": _rank(),
            "group": os.environ.get("TORCHELASTIC_RUN_ID")}  # fmt: skip


class RunFolder:
    """A folder claimed for writing by this process (see the module). Claims within one
    process share the lock: the process is the writer (a demo writes its training run into its
    own folder; a resumed trainer is made again in the same process)."""

    def __init__(self, root: Path, kind: str, lock_fd: int) -> None:
        self.root, self.kind, self._fd, self._holders = root, kind, lock_fd, 1

    @classmethod
    def claim(cls, root: Path | str, kind: str) -> RunFolder:
        """Create or take ``root`` for writing ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown run folder kind {kind!r}; one of {sorted(KINDS)}")
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RunFolderError(f"{root} is a file, not a folder")
        held = _HELD.get(root.resolve())
        if held is not None:
            if held.kind != kind:
                raise RunFolderError(f"{root} is this process's {KINDS[held.kind]}, not "
                                     f"{KINDS[kind]}")  # fmt: skip
            held._holders += 1
            return held
        fd = _lock(root, kind)
        try:
            _check_record(root, kind)
        except BaseException:
            os.close(fd)
            raise
        folder = _HELD[root.resolve()] = cls(root, kind, fd)
        return folder

    @classmethod
    def join(cls, root: Path | str, kind: str) -> RunFolder:
        """This process's claim of ``root`` whatever its kind, or a new claim as ``kind``: for
        a component (the trainer) that writes into a folder its command may have claimed."""
        held = _HELD.get(Path(root).resolve())
        if held is None:
            return cls.claim(root, kind)
        held._holders += 1
        return held

    def inside(self, relative: str | Path) -> Path:
        """``root / relative``, refused if it would leave the folder (:func:`io.inside`)."""
        return inside(self.root, relative)

    def release(self) -> None:
        """Let go of this claim; the lock goes with the process's last one."""
        self._holders -= 1
        if self._holders == 0 and self._fd is not None:
            _HELD.pop(self.root.resolve(), None)
            os.close(self._fd)  # (the lock goes with the descriptor)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(root: Path, kind: str) -> int:
    """An exclusive lock on ``root`` for this rank, or a refusal naming who holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".writer-rank{_rank()}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(
            f"{root} is being written by {holder}: one writer at a time (wait for it to end, or "
            f"write {KINDS[kind]} into another folder)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_writer()).encode())
    return fd


def _check_record(root: Path, kind: str) -> None:
    """The folder's record must be this kind's, of this format; a new folder gets one. Every
    rank may create it (created exclusively: of ranks starting together one writes it, the
    others read it), and each writes its record before any other file."""
    record_path = root / RECORD
    if not record_path.exists():
        others = [p.name for p in root.iterdir() if not p.name.startswith(".")]
        if others:
            shown = ", ".join(sorted(others)[:4]) + (" ..." if len(others) > 4 else "")
            raise RunFolderError(
                f"{root} holds files ({shown}) but no {RECORD}: an earlier datarater's folder "
                f"or not a datarater folder; write {KINDS[kind]} into a new folder (an earlier "
                "version's run is redone from its inputs with this version)"
            )
        try:
            atomic_write_json(record_path, {"format": FORMAT, "kind": kind}, exclusive=True)
            return
        except FileExistsError:  # another rank's, a moment ago: read and check it
            pass
    try:
        record = json.loads(record_path.read_text())
        fmt, found = record["format"], record["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFolderError(f"{record_path} is not a readable run record ({e})") from e
    if fmt != FORMAT:
        raise RunFolderError(
            f"{root} was written by datarater's run format {fmt}; this version writes format "
            f"{FORMAT}: redo {KINDS.get(found, 'it')} into a new folder"
        )
    if found != kind:
        raise RunFolderError(
            f"{root} holds {KINDS.get(found, found)}, not {KINDS[kind]}: write into another "
            "folder (no command writes over another's folder)"
        )


def kind_of(root: Path | str) -> str | None:
    """The kind a folder's record names (None: no record)."""
    try:
        return json.loads((Path(root) / RECORD).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
