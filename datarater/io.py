"""Files written so that a crash never leaves half of one: atomic writes (files, text, JSON,
plots), the folder syncs they need, the clean-up of what a killed writer left, and the one
digest every record of an input uses.

Every layer that writes (training, scoring, evaluation, the demo) writes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

_HOST = socket.gethostname().replace(".", "-")


def fsync(path: Path) -> None:
    """Flush a file or (POSIX) a folder's entries to disk; a read-only descriptor suffices on
    POSIX, so a umask without the owner's write bit is no obstacle."""
    if os.name == "nt":
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without setting it (setting it, even for an instant, would
    give another thread's new files the wrong mode): from /proc on Linux, else as it was when
    this module was imported."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask_once()


def atomic_write(
    path: Path | str, write: Callable[[Path], object], exclusive: bool = False
) -> None:
    """Let ``write(tmp)`` write a file, then put it at ``path`` so that readers see the old or
    the new file, never a part, even after a power loss (the file and then its folder synced).
    The temporary name is unique (host, process, random), so concurrent writers cannot
    collide, and :func:`remove_stale_temporaries` can find those a killed process left.
    ``exclusive``: only if ``path`` does not exist yet (else FileExistsError), also atomically
    where the filesystem has hard links: of two processes creating it at once, one wins."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        # an ordinary file's mode: some writers (safetensors) create theirs readable by the
        # owner only, and a team sharing a run folder could not read its checkpoints
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:  # a filesystem without modes: nothing to set
            pass
        fsync(tmp)
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists
            except FileExistsError:
                raise
            except OSError:  # no hard links here (vfat, SMB, object stores): create, fill
                with open(path, "xb") as f:
                    f.write(tmp.read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str, exclusive: bool = False) -> None:
    """``text`` at ``path``, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text), exclusive)


def atomic_save_png(fig, path: Path | str, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at ``path``, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when a process of
    this host was killed (SIGKILL, out of memory) before it could; those of live processes
    and of other hosts (a shared filesystem) are left alone. Returns how many it removed."""
    removed = 0
    for tmp in Path(folder).glob(f".*.{_HOST}.*.tmp"):
        pid = tmp.name[: -len(".tmp")].split(".")[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True


def atomic_write_json(path: Path | str, obj, exclusive: bool = False) -> None:
    """``obj`` as strict JSON (no NaN: a reader in another language could not parse it)."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n", exclusive)


def inside(root: Path | str, relative: str | Path, what: str = "a path") -> Path:
    """``root / relative``, refused if it leaves ``root`` (absolute, ``..``, a link out): a
    file of a folder (a checkpoint pointer, a rater's tokenizer) may not point elsewhere."""
    root = Path(root)
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root.resolve()):
        raise ValueError(f"{what} {str(relative)!r} leads outside {root}: refused")
    return path


DIGEST_BYTES = 1 << 20  # files are read in pieces: a digest never holds a whole input


def digest(*parts) -> str:
    """One SHA-256, as hex, of ``parts`` in order: a file (a ``Path``: its bytes, read in
    pieces), a tensor (its dtype, shape and bytes), bytes, or any other value (its repr). What
    every record of an input compares: a copied file with a new modification time is still the
    same input, a wrapper around the same rater is the same rater."""
    import torch

    h = hashlib.sha256()
    for x in parts:
        if isinstance(x, Path):
            with open(x, "rb") as f:
                while chunk := f.read(DIGEST_BYTES):
                    h.update(chunk)
        elif isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, bytes):
            h.update(x)
        else:
            h.update(repr(x).encode())
    return h.hexdigest()
