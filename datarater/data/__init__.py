"""Data: reading corpora, tokenising, shaping sequences, splitting."""

from .corpus import CorpusError, ReadReport, read_documents
from .tokens import (
    ByteTokenizer,
    HFTokenizer,
    Sequences,
    get_tokenizer,
    overlap,
    pack,
    per_document,
    split_heldout,
)

__all__ = [
    "ByteTokenizer",
    "CorpusError",
    "HFTokenizer",
    "ReadReport",
    "Sequences",
    "get_tokenizer",
    "overlap",
    "pack",
    "per_document",
    "read_documents",
    "split_heldout",
]
