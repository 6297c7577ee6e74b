"""Tokenising and shaping documents into fixed-length training sequences.

The built-in tokenizer is byte-level (UTF-8 bytes 0..255, then EOS and PAD): nothing to
download, any text works. A local Hugging Face ``tokenizers`` file can be used instead.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class ByteTokenizer:
    """UTF-8 bytes as tokens; id 256 ends a document, 257 pads."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local ``tokenizers`` JSON file (no download); EOS and PAD are appended ids."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ValueError("a tokenizer file needs `pip install tokenizers`") from e
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
        # past the largest id in use, not the count of ids: a vocabulary with gaps would put
        # EOS and PAD on real tokens
        base = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eos_id, self.pad_id, self.vocab_size = base, base + 1, base + 2
        self.name = str(Path(path).resolve())  # recorded with a rater: valid from any folder

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once: ``tokenizers`` spreads them over its Rust threads, which pays
        on many-core scoring hosts (on the 2-core VM, busy, both ran at ~1.4M tokens/s)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if i < self.eos_id])


def get_tokenizer(name: str | None):
    return ByteTokenizer() if name in (None, "bytes") else HFTokenizer(name)


def encode_all(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every text, each followed by EOS; in one batched call when the
    tokenizer has ``encode_batch`` (a user's tokenizer may have only ``encode``)."""
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    return [list(t) + [tokenizer.eos_id] for t in ids]


@dataclass
class Sequences:
    """Fixed-length training sequences: ids [N, L], loss mask [N, L], and the document each came
    from (for per-document scores and labels)."""

    input_ids: Tensor
    loss_mask: Tensor
    doc_index: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: Tensor) -> Sequences:
        return Sequences(self.input_ids[index], self.loss_mask[index], self.doc_index[index])

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "loss_mask": self.loss_mask[index]}


def pack(docs: Sequence[str], tokenizer, seq_len: int) -> Sequences:
    """Pre-training style: documents joined with EOS and cut into full sequences of seq_len.

    A sequence may span documents; ``doc_index`` names the document of its first token.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids, owner = [], []
    for d, toks in enumerate(encode_all(tokenizer, docs)):
        ids.extend(toks)
        owner.extend([d] * len(toks))
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    doc = torch.tensor(owner[: n * seq_len : seq_len], dtype=torch.long)
    return Sequences(t, torch.ones_like(t, dtype=torch.float32), doc)


def per_document(docs: Sequence[str], tokenizer, seq_len: int, max_windows: int = 1) -> Sequences:
    """One sequence per document window (up to ``max_windows`` per document), padded with a
    zero loss mask: a score then belongs to exactly one document."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows, masks, owner = [], [], []
    short = 0
    for d, toks in enumerate(encode_all(tokenizer, docs)):
        if len(toks) < seq_len:
            short += 1
        for w in range(max_windows):
            piece = toks[w * seq_len : (w + 1) * seq_len]
            if len(piece) < 2:
                break
            pad = seq_len - len(piece)
            rows.append(piece + [tokenizer.pad_id] * pad)
            masks.append([1.0] * len(piece) + [0.0] * pad)
            owner.append(d)
    if not rows:
        raise ValueError("no document has at least 2 tokens")
    if short:
        warnings.warn(
            f"{short} of {len(docs)} documents are shorter than seq_len={seq_len} and were padded",
            stacklevel=2,
        )
    return Sequences(torch.tensor(rows), torch.tensor(masks), torch.tensor(owner))


def split_heldout(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic disjoint (train, held-out) index split of n items."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"cannot hold out {k} of {n} items and keep some for training")
    return perm[k:].sort().values, perm[:k].sort().values


def overlap(train_docs: Sequence[str], heldout_docs: Sequence[str]) -> int:
    """How many held-out documents also occur (verbatim) in the training documents."""
    seen = {hashlib.sha1(d.encode("utf-8", errors="replace")).digest() for d in train_docs}
    return sum(
        hashlib.sha1(d.encode("utf-8", errors="replace")).digest() in seen for d in heldout_docs
    )
