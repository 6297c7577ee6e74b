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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io import atomic_write, atomic_write_text, fsync, inside


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
    fsync(root)
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
    name = latest.read_text().strip()
    folder = inside(root, name, f"{latest} names a checkpoint that")
    if folder.parent != root.resolve() or not name.startswith("step-"):
        raise ValueError(f"{latest} names {name!r}: not one of this folder's checkpoints")
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
