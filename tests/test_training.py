"""Meta-training: population trainer, crash-safe checkpoints, bitwise resume, the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from datarater.cli import main
from datarater.training import TrainConfig, load_rater

from .conftest import torchrun

TINY = dict(d_model=16, n_layers=1, n_heads=2)
CONFIG = dict(
    steps=8,
    population=2,
    inner_steps=2,
    inner_batch=4,
    outer_batch=4,
    lifetime=3,
    checkpoint_every=1,
    lm=TINY,
    rater=TINY,
    meta_warmup=2,
)


def _corpus(path: Path, n: int = 120) -> Path:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    rng = random.Random(0)
    rows = [{"text": text[i : i + rng.randint(40, 200)]} for i in range(0, 200 * n, 200)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _train_cmd(data: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "datarater.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--seq-len",
        "32",
        "--quiet",
        *extra,
    ]


def test_sigkill_then_resume_gives_the_same_rater_bytes(tmp_path):
    data = _corpus(tmp_path / "c.jsonl")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_cmd(data, tmp_path / "whole", cfg), check=True, env=env, capture_output=True
    )
    kill_at = random.Random().randint(2, 6)
    proc = subprocess.Popen(
        _train_cmd(data, tmp_path / "cut", cfg),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "rater" / "rater.safetensors").exists()
    subprocess.run(
        _train_cmd(data, tmp_path / "cut", cfg, "--resume"),
        check=True,
        env=env,
        capture_output=True,
    )
    whole = (tmp_path / "whole" / "rater" / "rater.safetensors").read_bytes()
    resumed = (tmp_path / "cut" / "rater" / "rater.safetensors").read_bytes()
    assert whole == resumed, f"killed after {kill_at} steps"
    rater = load_rater(tmp_path / "cut" / "rater")
    assert rater(torch.randint(0, 258, (2, 32))).shape == (2,)
    log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log]
    assert steps == list(range(1, CONFIG["steps"] + 1))  # no step logged twice


def test_resume_drops_log_rows_after_the_checkpoint_and_names_changed_settings(tmp_path):
    from datarater.data import ByteTokenizer, per_document
    from datarater.training import Trainer

    seqs = per_document([f"document number {i} " * 3 for i in range(12)], ByteTokenizer(), 32)
    cfg = TrainConfig.from_dict({**CONFIG, "steps": 4, "checkpoint_every": 2})
    Trainer(cfg, seqs, seqs, 258, tmp_path, 257).run(progress=False, stop_after=3)  # "crash"
    log = tmp_path / "log.jsonl"
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    again = Trainer(cfg, seqs, seqs, 258, tmp_path, 257)
    assert again.resume() and again.step == 2
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    again.run(progress=False)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    # a crash before the first checkpoint: the resumed run starts its log again
    fresh = tmp_path / "fresh"
    Trainer(cfg, seqs, seqs, 258, fresh, 257).run(progress=False, stop_after=1)
    assert not (fresh / "checkpoints").exists() and (fresh / "log.jsonl").read_text()
    assert not Trainer(cfg, seqs, seqs, 258, fresh, 257).resume()
    assert (fresh / "log.jsonl").read_text() == ""
    longer = TrainConfig.from_dict({**CONFIG, "steps": 6, "checkpoint_every": 2})
    with pytest.raises(ValueError, match="steps: 4 then, 6 now"):
        Trainer(longer, seqs, seqs, 258, tmp_path, 257).resume()


def test_resume_refuses_other_data_shapes_or_process_counts(tmp_path):
    """A resumed run must read the same token sequences with the same model shapes, in as
    many processes as wrote the checkpoints: otherwise it is refused, by name."""
    import shutil

    from datarater.data import ByteTokenizer, per_document
    from datarater.training import Trainer

    docs = [f"document number {i} " * 3 for i in range(12)]
    seqs = per_document(docs, ByteTokenizer(), 32)
    cfg = TrainConfig.from_dict({**CONFIG, "steps": 2, "checkpoint_every": 2})
    Trainer(cfg, seqs, seqs, 258, tmp_path, 257).run(progress=False)
    other = per_document(list(reversed(docs)), ByteTokenizer(), 32)
    with pytest.raises(ValueError, match="other training or held-out data"):
        Trainer(cfg, other, other, 258, tmp_path, 257).resume()
    longer = per_document(docs, ByteTokenizer(), 40)
    with pytest.raises(ValueError, match="other lm settings"):
        Trainer(cfg, longer, longer, 258, tmp_path, 257).resume()
    assert Trainer(cfg, seqs, seqs, 258, tmp_path, 257).resume()
    # the same shapes written out in full (as a partial dict merged with --size now is)
    spelled = TrainConfig.from_dict({**asdict(cfg), "lm": {**cfg.lm, "mlp_ratio": 4}})
    assert Trainer(spelled, seqs, seqs, 258, tmp_path, 257).resume()
    reseeded = TrainConfig.from_dict({**asdict(cfg), "seed": cfg.seed + 1})
    with pytest.raises(ValueError, match="seed: 0 then, 1 now"):  # a setting, not "other data"
        Trainer(reseeded, seqs, seqs, 258, tmp_path, 257).resume()
    # checkpoints of a two-process run, resumed by one process
    two = tmp_path / "two"
    shutil.copytree(tmp_path / "checkpoints", two / "checkpoints" / "rank-0")
    shutil.copytree(tmp_path / "checkpoints", two / "checkpoints" / "rank-1")
    shutil.copy(tmp_path / "run.json", two / "run.json")  # (copied by hand: its record too)
    with pytest.raises(ValueError, match=r"written under torchrun \(ranks \[0, 1\]\)"):
        Trainer(cfg, seqs, seqs, 258, two, 257).resume()
    # two ranks at different steps (a crash between their checkpoints): refused, not resumed
    # out of step (tested here through the check itself: one process cannot be two ranks)
    lagging = Trainer(cfg, seqs, seqs, 258, two, 257)
    lagging.world = 2
    (two / "checkpoints" / "rank-1" / "LATEST").write_text("step-000000")
    with pytest.raises(ValueError, match="rank 0: step-000002, rank 1: step-000000"):
        lagging.resume()
    (two / "checkpoints" / "rank-1" / "LATEST").unlink()  # rank 1 never wrote one
    with pytest.raises(ValueError, match=r"do not fit a run of 2 processes \(rank 0: step"):
        lagging.resume()


def test_train_cli_guards_its_output_folder_and_device(tmp_path, capsys):
    data = _corpus(tmp_path / "c.jsonl", n=60)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**CONFIG, "steps": 1}))
    args = ["train", "--data", str(data), "--config", str(cfg), "--seq-len", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    # a second run into the same folder would overwrite the first one's rater and checkpoints
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main([*args, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()  # refused before anything was written


def test_cli_errors_are_messages(tmp_path, capsys):
    data = _corpus(tmp_path / "c.jsonl", n=30)
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(data), "--text-column", "body", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no column 'body'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 3, "learning_rate": 1}))
    assert (
        main(["train", "--data", str(data), "--config", str(bad), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "unknown training settings ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="population must be an int >= 1"):
        TrainConfig(population=0)


def test_heldout_overlap_warns(tmp_path):
    data = _corpus(tmp_path / "c.jsonl", n=60)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**CONFIG, "steps": 1}))
    with pytest.warns(UserWarning, match="held-out documents also occur"):
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--heldout",
                    str(data),
                    "--config",
                    str(cfg),
                    "--out",
                    str(tmp_path / "o"),
                    "--seq-len",
                    "32",
                    "--quiet",
                ]
            )
            == 0
        )


def test_two_torchrun_processes_give_the_rater_of_one(tmp_path):
    data = _corpus(tmp_path / "c.jsonl")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**CONFIG, "steps": 4}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _train_cmd(data, tmp_path / "one", cfg), check=True, env=env, capture_output=True
    )
    cmd = torchrun("-m", "datarater.cli", *_train_cmd(data, tmp_path / "two", cfg)[3:])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    one = (tmp_path / "one" / "rater" / "rater.safetensors").read_bytes()
    two = (tmp_path / "two" / "rater" / "rater.safetensors").read_bytes()
    assert one == two
    assert (tmp_path / "two" / "log.rank1.jsonl").exists()


def test_resume_refuses_another_tokenizer(tmp_path):
    from datarater.data import ByteTokenizer, per_document
    from datarater.training import Trainer

    docs = [f"document number {i} " * 3 for i in range(12)]
    seqs = per_document(docs, ByteTokenizer(), 32)
    cfg = TrainConfig.from_dict({**CONFIG, "steps": 1})
    Trainer(cfg, seqs, seqs, 258, tmp_path, 257).run(progress=False)
    again = Trainer(cfg, seqs, seqs, 258, tmp_path, 257, tokenizer="/elsewhere/tok.json")
    with pytest.raises(ValueError, match="written with tokenizer bytes"):
        again.resume()
    assert Trainer(cfg, seqs, seqs, 258, tmp_path, 257).resume()


def test_load_rater_takes_a_training_checkpoint_and_points_from_a_run_folder(tmp_path):
    from datarater.data import ByteTokenizer, per_document
    from datarater.training import Trainer

    seqs = per_document([f"document number {i} " * 3 for i in range(12)], ByteTokenizer(), 32)
    cfg = TrainConfig.from_dict({**CONFIG, "steps": 3, "checkpoint_every": 1})
    Trainer(cfg, seqs, seqs, 258, tmp_path, 257).run(progress=False)
    final = load_rater(tmp_path / "rater")
    last = load_rater(tmp_path / "checkpoints" / "step-000003")
    earlier = load_rater(tmp_path / "checkpoints" / "step-000002")
    assert not last.training and last.tokenizer == final.tokenizer == "bytes"

    def same(a, b) -> bool:
        pairs = zip(a.state_dict().values(), b.state_dict().values())
        return all(torch.equal(x, y) for x, y in pairs)

    assert same(last, final) and not same(earlier, final)
    with pytest.raises(FileNotFoundError, match="is a training run folder: its rater is"):
        load_rater(tmp_path)


@pytest.mark.parametrize("command", ["demo", "train", "score", "filter", "analyze", "evaluate"])
def test_every_command_has_help_with_the_defaults_worth_knowing(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: datarater {command}" in out
    expected = {"train": "(default: 128)", "score": "(default: 64)", "filter": "(default: 0.5)"}
    assert expected.get(command, "") in out
    assert "(default: None)" not in out and "(default: False)" not in out
    if command == "evaluate":  # the presets it lists (written out: no torch import for --help)
        from datarater.models.transformer import PRESETS

        listed = " ".join(out.split()).split("scoring eats the gain): ")[1].split(" (default")[0]
        assert listed.split(", ") == list(PRESETS)


def test_training_curves_are_drawn_at_checkpoints(tmp_path):
    from datarater.data import ByteTokenizer, per_document
    from datarater.training import Trainer
    from datarater.training.curves import _running_mean, plot_training

    seqs = per_document([f"document number {i} " * 3 for i in range(12)], ByteTokenizer(), 32)
    cfg = TrainConfig.from_dict({**CONFIG, "steps": 4, "checkpoint_every": 2})
    trainer = Trainer(cfg, seqs, seqs, 258, tmp_path, 257)
    trainer.run(progress=False, stop_after=1)
    assert not (tmp_path / "meta_training.png").exists()  # no checkpoint yet
    trainer.run(progress=False)
    png = tmp_path / "meta_training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.glob("*.png*")] == [png.name]  # no temporary left
    # skipped steps (NaN norms, a missing loss) and a changing population still draw
    history = [dict(r) for r in trainer.history]
    history[1]["meta_grad_norms"] = [float("nan"), None]  # a skipped model is None
    history[2]["outer_loss"] = None
    plot_training(history, tmp_path / "odd.png")
    assert (tmp_path / "odd.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no meta-steps"):
        plot_training([], tmp_path / "none.png")
    nan = float("nan")
    got = _running_mean([nan, 1.0, 3.0, nan, 5.0], 2)
    assert got[0] != got[0] and got[1:] == [1.0, 2.0, 2.0, 4.0]
    assert _running_mean([1.0, 2.0, 3.0, 4.0], 10) == [1.0, 1.5, 2.0, 2.5]
    import matplotlib

    backend = matplotlib.rcParams._get_backend_or_none()
    plot_training(history, tmp_path / "again.png")
    assert matplotlib.rcParams._get_backend_or_none() == backend  # a notebook's stays


def test_checkpoints_are_pruned_by_step_and_never_the_one_just_written(tmp_path):
    """Old checkpoints of later steps (a longer run, in the same folder) must not make the one
    just written the first to be pruned (LATEST would name a folder that is gone): they are
    removed; of the steps below, keep - 1 stay, ordered by number (a million sorts last)."""
    from datarater.training.checkpoint import load_checkpoint, save_checkpoint

    def save(step, keep=2):
        save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, {"step": step},
                        keep=keep)  # fmt: skip

    def steps():
        return sorted(int(p.name[5:]) for p in tmp_path.glob("step-*"))

    for step in (500, 600):
        save(step)
    save(60)
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 60 and tensors["x"].tolist() == [60.0, 60.0]
    assert steps() == [60]
    for step in (999_900, 1_000_000):
        save(step)
    assert steps() == [999_900, 1_000_000]
    save(1_000_100, keep=1)
    assert steps() == [1_000_100] and load_checkpoint(tmp_path)[1]["step"] == 1_000_100


def test_atomic_writes_survive_a_read_only_umask_and_killed_writers_leave_no_litter(tmp_path):
    import os
    import subprocess
    import sys

    from datarater.io import atomic_write, atomic_write_text, remove_stale_temporaries

    # files created without the owner's write bit: fsync must not need to open them for
    # writing (as root, permissions are not enforced and this passes either way)
    keep = os.umask(0o277)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(keep)
    assert (tmp_path / "a.json").read_text() == "{}"
    # a writer killed between writing and renaming leaves its temporary file behind
    code = (
        "import os, sys\n"
        "from datarater.io import atomic_write\n"
        "def die(tmp):\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    os._exit(9)\n"
        f"atomic_write({str(tmp_path / 'part.parquet')!r}, die)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    litter = list(tmp_path.glob(".part.parquet.*.tmp"))
    assert len(litter) == 1
    parts = litter[0].name.split(".")  # "", part, parquet, host, pid, random, tmp
    parts[-3] = str(os.getpid())  # this process: alive, so its file is kept
    live = tmp_path / ".".join(parts)
    live.write_bytes(b"a live writer's")
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [live.name]
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "a.json", lambda t: t.write_text("[]"), exclusive=True)
    assert not list(tmp_path.glob(".a.json.*"))  # the refused writer cleaned up


def test_checkpoints_are_ordinary_files_a_team_can_read(tmp_path):
    """safetensors creates its files readable by the owner only; every file written
    atomically takes the mode an ordinary file would (0644 under a umask of 022)."""
    from datarater.training.checkpoint import save_checkpoint

    keep = os.umask(0o022)
    try:
        final = save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"step": 3})
    finally:
        os.umask(keep)
    for name in ("tensors.safetensors", "meta.json"):
        assert (final / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize(
    "setting,match",
    [
        ({"steps": 2.5}, "steps must be an int >= 1"),
        ({"steps_between": -3}, "steps_between must be an int >= 0"),
        ({"inner_lr": float("inf")}, "inner_lr must be a finite number > 0"),
        ({"seed": "3"}, "seed must be an int"),
        ({"meta_clip": 0}, "meta_clip must be None or a finite number > 0"),
        ({"tau": True}, "tau must be a finite number > 0"),
        ({"micro_batch_size": 0}, "micro_batch_size must be None or an int >= 1"),
        ({"lm": None}, "lm must be a preset name from"),
        ({"rater": {"d_modle": 8}}, "rater must be a preset name from"),
    ],
)
def test_training_settings_are_checked_for_type_and_range(setting, match):
    """What a --config file may get wrong is named before any data is read (a float step
    count never ended its run; an infinite learning rate skipped every meta-step)."""
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(setting)
    with pytest.raises(ValueError, match="must be a JSON object"):
        TrainConfig.from_dict([1, 2])


def test_a_partial_model_setting_changes_only_those_fields_of_the_size(tmp_path):
    """--size small with {"lm": {"d_model": 32}}: small's layers and heads, d_model 32 (the
    dict used to replace the size, leaving TransformerConfig's defaults)."""
    from datarater.training.checkpoint import load_checkpoint

    data = _corpus(tmp_path / "c.jsonl", n=60)
    config = tmp_path / "cfg.json"
    settings = {**CONFIG, "steps": 1, "checkpoint_every": 1}
    config.write_text(json.dumps({**settings, "lm": {"d_model": 32}, "rater": {"d_model": 16}}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--config", str(config), "--size", "small",
                 "--seq-len", "32", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    _, meta = load_checkpoint(out / "checkpoints")
    assert (meta["lm"]["d_model"], meta["lm"]["n_layers"], meta["lm"]["n_heads"]) == (32, 4, 4)
    assert (meta["rater"]["d_model"], meta["rater"]["n_layers"]) == (16, 4)


def test_numpy_numbers_are_taken_and_stored_as_plain_ones():
    """...and what older versions took stays valid: no meta clipping, negative seeds, the
    models' vocabulary or context in their dicts."""
    import numpy as np

    cfg = TrainConfig(steps=np.int64(5), seed=np.int32(2), meta_clip=1, inner_lr=np.float32(0.5))
    assert (type(cfg.steps), type(cfg.seed), type(cfg.meta_clip)) == (int, int, float)
    json.dumps(asdict(cfg))  # what every checkpoint holds
    TrainConfig(meta_clip=None, seed=-1, rater={"d_model": 16, "max_seq_len": 256})


def test_train_in_bf16_on_the_cpu(tmp_path):
    """--precision bf16 runs the inner models' compute in bf16 (the meta-gradients and every
    saved tensor stay float32), and the setting is recorded with the run."""
    from datarater.training.checkpoint import load_checkpoint

    data = _corpus(tmp_path / "c.jsonl", n=60)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**CONFIG, "steps": 2, "checkpoint_every": 1}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--config", str(config), "--seq-len", "32",
                 "--precision", "bf16", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    tensors, meta = load_checkpoint(out / "checkpoints")
    assert meta["config"]["precision"] == "bf16"
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")


def test_a_run_that_learned_nothing_says_so_and_fails(tmp_path, capsys):
    """Every meta-step skipped (non-finite meta-gradients): it used to say "rater written" and
    exit 0 with the untrained rater."""
    data = _corpus(tmp_path / "c.jsonl", n=60)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**CONFIG, "steps": 2, "inner_lr": 1e30}))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--config", str(config), "--seq-len", "32",
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 1
    assert "every one of the 2 meta-steps was skipped" in capsys.readouterr().err
    assert not (out / "rater").exists()


def test_expected_failures_end_in_one_line(tmp_path, capsys, monkeypatch):
    """A full disk, a read-only folder, an interrupt: one line and a non-zero status, never a
    traceback."""
    import errno

    import datarater.cli as cli

    for error, code, said in (
        (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), 1,
         "No space left on device"),
        (KeyboardInterrupt(), 130, "interrupted; run the same command again"),
    ):  # fmt: skip

        def fail(args, error=error):
            raise error

        monkeypatch.setattr(cli, "_filter", fail)
        assert main(["filter", "--scored", str(tmp_path), "--out", str(tmp_path / "o")]) == code
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
