"""Run folders (datarater.runs): one writer at a time, a kind no other command writes over, a
format version, and files that cannot point outside their folder. Each case was a fault found
by trying the commands as a hostile user would (they all ran, and lost or mixed data)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datarater.cli import main
from datarater.runs import FORMAT, RunFolder, RunFolderError
from datarater.scoring.score import SCORE_COLUMN

from .conftest import byte_rater


class _Holder:
    """Another process holding ``folder`` as a writer of ``kind`` until closed."""

    def __init__(self, folder: Path, kind: str) -> None:
        code = (
            "import sys, time\n"
            "from datarater.runs import RunFolder\n"
            f"RunFolder.claim({str(folder)!r}, {kind!r})\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "held"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _scored(folder: Path, rows: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = {"text": [f"t{j}" for j in range(rows)], SCORE_COLUMN: [float(j) for j in range(rows)]}
    pq.write_table(pa.table(table), folder / "part-00000.parquet")
    return folder


def _corpus(path: Path, n: int = 60) -> Path:
    path.write_text("".join(json.dumps({"text": f"document {i} " * 4}) + "\n" for i in range(n)))
    return path


def test_a_second_writer_is_refused_by_name_for_every_command(tmp_path, capsys):
    """Two runs into one folder at once: the second is refused, naming the first (before,
    two scores lost half the shards, two filters mixed their parts, two trains interleaved
    their logs, and all exited 0)."""
    from datarater.training import save_rater

    rater_dir = tmp_path / "rater"
    save_rater(byte_rater(), rater_dir)
    data = _corpus(tmp_path / "c.jsonl")
    scored = _scored(tmp_path / "scored")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"steps": 1, "population": 1, "inner_batch": 4,
                                  "outer_batch": 4, "lm": {"d_model": 16, "n_layers": 1},
                                  "rater": {"d_model": 16, "n_layers": 1}}))  # fmt: skip
    commands = {
        "score": ["score", "--rater", str(rater_dir), "--data", str(data), "--quiet"],
        "filter": ["filter", "--scored", str(scored)],
        "train": ["train", "--data", str(data), "--config", str(config), "--seq-len", "32",
                  "--quiet"],
    }  # fmt: skip
    for kind, args in commands.items():
        out = tmp_path / f"out-{kind}"
        holder = _Holder(out, kind)
        try:
            assert main([*args, "--out", str(out)]) == 2, kind
            err = capsys.readouterr().err
            assert "is being written by" in err and '"pid"' in err, err
        finally:
            holder.close()
        assert main([*args, "--out", str(out)]) == 0, kind  # the lock went with its process
        capsys.readouterr()


def test_the_library_entry_points_take_the_folder_too(tmp_path):
    """evaluate and the demo claim their folders in the library, not only in the CLI."""
    from datarater.demo import run_demo

    out = tmp_path / "demo"
    holder = _Holder(out, "demo")
    try:
        with pytest.raises(RunFolderError, match="is being written by"):
            run_demo(out, quick=True, progress=False)
    finally:
        holder.close()
    evaluation = tmp_path / "evaluation"
    RunFolder.claim(evaluation, "evaluate").release()
    with pytest.raises(RunFolderError, match="holds an evaluation, not a demo"):
        run_demo(evaluation, quick=True, progress=False)


def test_no_command_writes_over_another_commands_folder(tmp_path, capsys):
    """`filter --out` onto another scored folder used to replace its parts and keep its
    completion markers: readers then saw half the rows."""
    scored, other = _scored(tmp_path / "scored"), tmp_path / "other"
    RunFolder.claim(other, "score").release()
    before = sorted(p.name for p in other.iterdir())
    assert main(["filter", "--scored", str(scored), "--out", str(other)]) == 2
    assert "holds a scored folder, not a filtered folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == before


def test_a_folder_of_another_format_or_none_is_refused_with_how_to_redo_it(tmp_path, capsys):
    scored = _scored(tmp_path / "scored")
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"format": FORMAT - 1, "kind": "filter"}))
    assert main(["filter", "--scored", str(scored), "--out", str(old)]) == 2
    assert f"run format {FORMAT - 1}; this version writes format {FORMAT}: redo" in (
        capsys.readouterr().err
    )
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / "part-00000.parquet").write_bytes(b"an earlier version's part")
    assert main(["filter", "--scored", str(scored), "--out", str(unmarked)]) == 2
    assert "holds files (part-00000.parquet) but no run.json" in capsys.readouterr().err


def test_a_folders_files_cannot_point_outside_it(tmp_path):
    """A checkpoint pointer naming another run's checkpoint was followed; a rater config's
    tokenizer path could be absolute or climb out of its folder."""
    import torch

    from datarater.training import load_rater, save_rater
    from datarater.training.checkpoint import load_checkpoint, save_checkpoint

    for run in ("a", "b"):
        save_checkpoint(tmp_path / run / "checkpoints", 3, {"x": torch.zeros(2)}, {"step": 3})
    (tmp_path / "a" / "checkpoints" / "LATEST").write_text("../../b/checkpoints/step-000003")
    with pytest.raises(ValueError, match="leads outside"):
        load_checkpoint(tmp_path / "a" / "checkpoints")
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "rater"
    save_rater(byte_rater(), folder)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "rater.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored = json.loads(f.metadata()["datarater"])
    for elsewhere in ("/etc/hostname", "../../tokenizer.json"):  # both files crafted alike
        (folder / "config.json").write_text(json.dumps({**config, "tokenizer": elsewhere}))
        save_file(
            tensors, str(weights), {"datarater": json.dumps({**stored, "tokenizer": elsewhere})}
        )
        with pytest.raises(ValueError, match="the tokenizer .* leads outside"):
            load_rater(folder)


def test_claims_within_one_process_share_the_lock(tmp_path):
    first = RunFolder.claim(tmp_path / "run", "train")
    again = RunFolder.claim(tmp_path / "run", "train")
    assert again is first
    with pytest.raises(RunFolderError, match="this process's a training run, not a demo"):
        RunFolder.claim(tmp_path / "run", "demo")
    assert RunFolder.join(tmp_path / "run", "demo") is first  # a component inside a command
    for _ in range(3):
        first.release()
    time.sleep(0)
    holder = _Holder(tmp_path / "run", "train")  # released: another process may take it
    holder.close()


def test_a_crafted_rater_config_is_refused_before_anything_is_allocated(tmp_path):
    """A config asking for a vast model beside small weights used to allocate the model (9 GB
    for the one tried) before the shapes were compared."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from datarater.profiling import peak_tensor_bytes
    from datarater.training import load_rater, save_rater

    folder = tmp_path / "rater"
    save_rater(byte_rater(), folder)
    config = json.loads((folder / "config.json").read_text())
    vast = {**config, "rater": {**config["rater"], "d_model": 8192, "n_layers": 64}}
    (folder / "config.json").write_text(json.dumps(vast))
    weights = folder / "rater.safetensors"  # its own copy of the config crafted alike
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored = json.loads(f.metadata()["datarater"])
    save_file(tensors, str(weights), {"datarater": json.dumps({**stored, "rater": vast["rater"]})})

    def load():
        with pytest.raises(ValueError, match="weights do not match"):
            load_rater(folder)

    peak, _ = peak_tensor_bytes(load)
    assert peak < 50e6, peak  # the small weights read, nothing of the vast model's size


def test_a_part_deleted_under_its_marker_is_scored_again(tmp_path):
    """Its marker alone used to mark the shard done: the rerun skipped it and readers were
    one shard short without a word."""
    from datarater.scoring.score import score_files, unfinished_inputs

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"s{i}.jsonl").write_text(
            "".join(json.dumps({"text": f"shard {i} row {j}"}) + "\n" for j in range(5))
        )
    out = tmp_path / "scored"
    score_files(byte_rater(), [str(data)], "text", out, progress=False)
    (out / "part-00001.parquet").unlink()
    assert unfinished_inputs(out) == [str((data / "s1.jsonl").resolve())]
    report = score_files(byte_rater(), [str(data)], "text", out, progress=False)
    assert (report["done"], report["skipped"]) == (1, 1)
    assert pq.read_table(out / "part-00001.parquet").num_rows == 5


def test_readers_refuse_a_filter_folder_cut_short(tmp_path, capsys):
    """analyze read the parts of a filter stopped half-way without a word."""
    scored = _scored(tmp_path / "scored")
    kept = tmp_path / "kept"
    assert main(["filter", "--scored", str(scored), "--out", str(kept)]) == 0
    capsys.readouterr()
    (kept / "stats.json").unlink()  # as a filter killed while replacing its parts leaves it
    assert main(["analyze", "--scored", str(kept), "--out", str(tmp_path / "a")]) == 2
    assert "a filter stopped before it finished" in capsys.readouterr().err


def test_an_all_garbage_shard_fails_even_with_skip_bad_rows(tmp_path, capsys):
    """It used to end with 0 rows, an empty part and exit 0."""
    from datarater.training import save_rater

    rater_dir = tmp_path / "rater"
    save_rater(byte_rater(), rater_dir)
    data = tmp_path / "garbage.jsonl"
    data.write_text("".join(json.dumps({"text": j}) + "\n" for j in range(4)))  # no strings
    out = tmp_path / "scored"
    args = ["score", "--rater", str(rater_dir), "--data", str(data), "--out", str(out),
            "--quiet", "--skip-bad-rows"]  # fmt: skip
    assert main(args) == 1
    assert "every one of its 4 rows is bad" in capsys.readouterr().err
    assert not list(out.glob("part-*"))
