"""Reading corpora and shaping sequences: formats, bad input, counts of what was skipped."""

from __future__ import annotations

import json

import pytest
import torch

from datarater.data import (
    ByteTokenizer,
    CorpusError,
    overlap,
    pack,
    per_document,
    read_documents,
    split_heldout,
)


def _jsonl(path, rows):
    path.write_bytes(
        b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows)
    )
    return path


def test_jsonl_with_bad_rows_counts_what_it_skips(tmp_path):
    f = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": "hello world"},
            {"text": ""},
            b"\xff\xfe bad\n",
            {"text": 3},
            {"text": None},
            {"text": "second doc"},
        ],
    )
    with pytest.warns(UserWarning, match="skipped"):
        docs, report = read_documents(f, "text")
    assert docs == ["hello world", "second doc"]
    assert report.skipped == {
        "empty document": 1,
        "invalid UTF-8": 1,
        "non-text value (int)": 1,
        "null value": 1,
    }


def test_missing_things_are_named(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_documents(tmp_path / "nope.jsonl")
    f = _jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    with pytest.raises(CorpusError, match="no column 'text'"):
        read_documents(f, "text")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match="no usable documents"):
        read_documents(empty)


def test_parquet_text_folder_and_in_memory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two doc"], "n": [1, 2]}), tmp_path / "a.parquet")
    docs, _ = read_documents(tmp_path / "a.parquet")
    assert docs == ["one doc", "two doc"]
    with pytest.raises(CorpusError, match="no column 'body'"):
        read_documents(tmp_path / "a.parquet", "body")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CorpusError, match="bad.parquet: not a readable parquet file"):
        read_documents(tmp_path / "bad.parquet")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "x.txt").write_text("first file")
    (folder / "y.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.warns(UserWarning, match="replacement"):
        docs, report = read_documents(folder)
    assert len(docs) == 2 and report.files == 2
    docs, _ = read_documents({"text": ["a", "b"]})
    assert docs == ["a", "b"]


def test_sequences_from_long_short_and_odd_documents():
    tok = ByteTokenizer()
    huge = "x" * (10 * 2**20)  # a 10 MB single-line document
    with pytest.warns(UserWarning, match="1 of 3 documents are shorter"):
        seqs = per_document([huge, "tiny", "é" * 40], tok, 32, max_windows=2)
    assert seqs.input_ids.shape == (5, 32) and seqs.doc_index.tolist() == [0, 0, 1, 2, 2]
    assert seqs.loss_mask[2].sum() == 5  # "tiny" + EOS, the rest padding
    packed = pack(["abc", "defgh"], tok, 4)
    assert packed.input_ids.tolist() == [[97, 98, 99, 256], [100, 101, 102, 103]]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack(["a"], tok, 64)


def test_heldout_split_is_deterministic_and_disjoint():
    a, b = split_heldout(100, 0.2, seed=3)
    a2, b2 = split_heldout(100, 0.2, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert len(b) == 20 and not set(a.tolist()) & set(b.tolist())
    assert overlap(["x", "y", "z"], ["y", "w"]) == 1


def test_saved_hugging_face_dataset_and_dataset_object(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["alpha doc", "beta doc", ""], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.warns(UserWarning, match="empty document"):
        docs, _ = read_documents(tmp_path / "saved", "content")
    assert docs == ["alpha doc", "beta doc"]
    with pytest.raises(CorpusError, match="no column 'text'"):
        read_documents(tmp_path / "saved", "text")
    with pytest.warns(UserWarning):
        docs, _ = read_documents(ds, "content")
    assert docs == ["alpha doc", "beta doc"]
    # a DatasetDict: the error names the splits rather than guessing one
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=r"splits \['train', 'validation'\].*dd/train"):
        read_documents(tmp_path / "dd", "content")
    with pytest.warns(UserWarning):
        docs, _ = read_documents(tmp_path / "dd" / "validation", "content")
    assert docs == ["alpha doc", "beta doc"]


def test_file_formats_look_through_compression_suffixes():
    from datarater.data.corpus import file_format

    names = {
        "a.jsonl": "jsonl",
        "shard.00001.JSONL.GZ": "jsonl",
        "a.json.zst": "jsonl",
        "a.ndjson.lz4": "jsonl",
        "notes.txt.bz2": "text",
        "a.parquet": "parquet",
        "data-00000-of-00002.arrow": "arrow",
        "a.parquet.gz": None,  # parquet compresses inside
        "backup.tar.gz": None,
        "README": None,
    }
    assert {n: file_format(n) for n in names} == names


def test_compressed_corpora_read_like_plain_ones(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rows = [{"text": f"document number {i}"} for i in range(5)]
    plain = _jsonl(tmp_path / "plain.jsonl", rows).read_bytes()
    folder = tmp_path / "mixed"
    folder.mkdir()
    for codec, suffix in (("gzip", "gz"), ("bz2", "bz2"), ("zstd", "zst"), ("lz4", "lz4")):
        with pa.OSFile(str(folder / f"{codec}.jsonl.{suffix}"), "wb") as raw:
            with pa.CompressedOutputStream(raw, codec) as out:
                out.write(plain)
        docs, report = read_documents(folder / f"{codec}.jsonl.{suffix}")
        assert docs == [r["text"] for r in rows] and report.files == 1
    with pa.OSFile(str(folder / "page.txt.gz"), "wb") as raw:
        with pa.CompressedOutputStream(raw, "gzip") as out:
            out.write(b"a whole text file, compressed")
    docs, report = read_documents(folder)
    assert report.files == 5 and len(docs) == 21
    assert "a whole text file, compressed" in docs
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(CorpusError, match="bad.jsonl.gz: cannot be read"):
        read_documents(tmp_path / "bad.jsonl.gz")


def test_a_local_tokenizers_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    from datarater.data import get_tokenizer

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the cat sat on the mat"] * 20,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]),
    )
    tok.save(str(tmp_path / "tok.json"))
    ours = get_tokenizer(str(tmp_path / "tok.json"))
    ids = ours.encode("the cat sat")
    assert ids and max(ids) < ours.eos_id < ours.pad_id < ours.vocab_size
    assert ours.decode(ids).replace(" ", "") == "thecatsat"
    seqs = per_document(["the cat sat on the mat " * 3], ours, 8)
    assert int(seqs.input_ids.max()) < ours.vocab_size
    # batched encoding (what scoring and training use) equals one call per text, and a
    # tokenizer with only encode() still works
    from datarater.data.tokens import encode_all

    texts = ["the cat", "", "mat sat the cat on the mat", "zebra"]
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]

    class OnlyEncode:
        eos_id = ours.eos_id
        encode = staticmethod(ours.encode)

    expected = [ours.encode(t) + [ours.eos_id] for t in texts]
    assert encode_all(ours, texts) == encode_all(OnlyEncode(), texts) == expected
    # a rater trained with it carries a copy: the folder can move and still score
    import shutil

    from datarater.models import Rater, TransformerConfig
    from datarater.scoring.score import score_texts
    from datarater.training import load_rater, save_rater

    cfg = TransformerConfig(vocab_size=ours.vocab_size, max_seq_len=8, d_model=8, n_layers=1,
                            n_heads=2)  # fmt: skip
    save_rater(Rater(cfg, pad_id=ours.pad_id), tmp_path / "r", tokenizer=ours.name)
    shutil.move(str(tmp_path / "r"), str(tmp_path / "moved"))
    (tmp_path / "tok.json").unlink()
    moved = load_rater(tmp_path / "moved")
    assert moved.tokenizer == str(tmp_path / "moved" / "tokenizer.json")
    assert score_texts(moved, ["the cat sat on the mat"]).isfinite().all()
    save_rater(moved, tmp_path / "again")  # re-saving keeps the tokenizer
    assert load_rater(tmp_path / "again").tokenizer.endswith("again/tokenizer.json")
    assert (tmp_path / "again" / "rater.safetensors").stat().st_mode & 0o077  # not 0600


def test_a_tokenizer_whose_ids_have_gaps_keeps_eos_and_pad_off_its_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    from datarater.data.tokens import HFTokenizer

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok.json"
    tok.save(str(path))
    ours = HFTokenizer(str(path))
    assert ours.encode("a b") == [1, 4]
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (5, 6, 7)  # past "b" (4), not on it


def test_a_byte_order_mark_and_unpaired_surrogates(tmp_path):
    """A jsonl file saved with a BOM keeps its first row; a row with a lone surrogate (valid
    JSON, no UTF-8 form: tokenizers refuse it) is skipped and counted."""
    path = tmp_path / "bom.jsonl"
    rows = [b'{"text": "the first document, after a byte-order mark"}',
            b'{"text": "a lone surrogate \\ud83d in a document"}',
            b'{"text": "the last document of the file"}']  # fmt: skip
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")
    with pytest.warns(UserWarning, match="unpaired surrogate"):
        docs, report = read_documents(str(path), "text")
    assert docs == ["the first document, after a byte-order mark", "the last document of the file"]


def test_training_log_rows_are_strict_json():
    import math

    from datarater.training.trainer import _json_safe

    row = {"step": 3, "outer_loss": math.nan, "meta_grad_norms": [1.0, math.inf], "x": "y"}
    assert json.dumps(_json_safe(row), allow_nan=False) == (
        '{"step": 3, "outer_loss": null, "meta_grad_norms": [1.0, null], "x": "y"}'
    )
