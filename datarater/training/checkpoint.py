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
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def atomic_write(
    path: Path | str, write: Callable[[Path], object], exclusive: bool = False
) -> None:
    """Let ``write(tmp)`` write a file, then put it at ``path`` so that readers see the old or
    the new file, never a part, even after a power loss (synced before the rename). The
    temporary name is unique, so concurrent writers (torchrun ranks) cannot collide.
    ``exclusive``: only if ``path`` does not exist yet (else FileExistsError), also atomically:
    of two processes creating it at once, one wins."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    """``text`` at ``path``, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep: int = 2
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(tmp / "tensors.safetensors"),
    )
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "LATEST", final.name)
    others = [p for p in sorted(root.glob("step-*")) if p != final]
    for old in others[: max(0, len(others) - (keep - 1))]:  # never the one just written
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
