"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder ``step-000123/`` holding ``tensors.safetensors`` and ``meta.json``.
It is written under a temporary name and renamed into place once complete; ``LATEST`` (a small
text file replaced atomically) names the newest complete one. A crash at any moment leaves the
previous checkpoint intact and readable. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_HOST = socket.gethostname().replace(".", "-")


def _fsync(path: Path) -> None:
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
        _fsync(tmp)
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
        _fsync(path.parent)
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


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep: int = 2
) -> Path:
    """Write the checkpoint of ``step``, point LATEST at it, and keep the ``keep - 1``
    checkpoints of the steps below it; those above it (an older run in the same folder, past
    the point this one restarted from) are removed."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(tmp / "tensors.safetensors", lambda t: save_file(cpu, str(t)))
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    atomic_write_text(root / "LATEST", final.name)
    below = sorted((p for p in root.glob("step-*") if p != final), key=_step_of)
    doomed = [p for p in below if _step_of(p) > step]
    below = [p for p in below if _step_of(p) < step]
    doomed += below[: max(0, len(below) - max(0, keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path) -> tuple[dict[str, Tensor], dict] | None:
    """The newest complete checkpoint under ``root``, or None if there is none."""
    latest = root / "LATEST"
    if not latest.exists():
        return None
    folder = root / latest.read_text().strip()
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"{folder}: LATEST names a checkpoint that is not there")
    meta = json.loads((folder / "meta.json").read_text())
    return load_file(str(folder / "tensors.safetensors")), meta


def flatten(prefix: str, tree) -> dict[str, Tensor]:
    """Nested dicts of tensors -> {"prefix.a.b": tensor}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(key, v))
        else:
            out[key] = v
    return out


def unflatten(prefix: str, flat: dict[str, Tensor], like) -> dict:
    """Inverse of ``flatten`` for a tree shaped like ``like``."""
    out = {}
    for k, v in like.items():
        key = f"{prefix}.{k}"
        out[k] = unflatten(key, flat, v) if isinstance(v, dict) else flat[key]
    return out


def rng_tensor(gen: torch.Generator) -> Tensor:
    return gen.get_state().clone()
