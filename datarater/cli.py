"""The ``datarater`` command line: demo, train, score, filter, analyze, evaluate."""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

SIZES = {  # inner LM and rater sizes; "cpu" finishes in minutes on 2 cores
    "cpu": dict(d_model=48, n_layers=2, n_heads=2),
    "small": dict(d_model=256, n_layers=4, n_heads=4),
    "base": dict(d_model=512, n_layers=8, n_heads=8),
}


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {default})"


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet,
                      fresh=args.fresh, precision=args.precision)  # fmt: skip
    print(json.dumps(report, indent=1))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _device(asked: str | None) -> str:
    """``--device``, default cuda when there is one; under torchrun each process takes the
    GPU of its local rank."""
    import os

    import torch

    device = asked or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a device ({e})") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
            "leave --device out to run on the CPU"
        )
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    elif device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        warnings.warn(
            f"--device {device} under torchrun puts every process of this node on that GPU; "
            "--device cuda gives each process its local rank's GPU",
            stacklevel=1,
        )
    return device


def _train(args: argparse.Namespace) -> int:
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # under torchrun: inner models are spread over the processes (NCCL on GPUs, gloo else)
        device = torch.device(_device(args.device))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train_run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _read(source: str, column: str, label: str) -> list[str]:
    """A corpus's documents, with one line saying what was kept and skipped (the warning
    ``read_documents`` gives a library caller would repeat it)."""
    from .data import read_documents

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\d+ documents from \d+ file")
        docs, report = read_documents(source, column)
    print(f"{label}: {report.summary()}")
    return docs


def _holds_a_run(out: Path) -> bool:
    """Whether ``out`` has a checkpoint, a log or a rater of an earlier ``train``."""
    return any((out / name).exists() for name in ("checkpoints", "log.jsonl", "rater")) or any(
        out.glob("log.rank*.jsonl")
    )


def _train_run(args: argparse.Namespace) -> int:
    import torch

    from .data import get_tokenizer, overlap, per_document, split_heldout
    from .training import TrainConfig, Trainer

    config = {}
    if args.config:
        path = _config_path(args.config)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"datarater train: {path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"--config {args.config}: training settings must be a JSON object")
    size = SIZES[args.size]
    for model in ("lm", "rater"):  # a partial model dict changes those fields of the size
        given = config.get(model, {})
        config[model] = {**size, **given} if isinstance(given, dict) else given
    for name in ("steps", "population", "inner_steps", "seed", "precision"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    if args.size == "cpu" and "steps" not in config:
        config["steps"] = 300  # about 5 minutes on 2 cores at the cpu size
    cfg = TrainConfig.from_dict(config)
    if args.dry_run:
        return _dry_run(args, cfg)
    if not args.data or not args.out:
        raise ValueError("datarater train needs --data and --out (only --dry-run goes without)")
    out = Path(args.out)
    if not args.resume and _holds_a_run(out):
        raise ValueError(
            f"{out} already holds a training run; pass --resume to continue it, or use a new --out"
        )
    device = _device(args.device)  # checked before the corpus is read
    tok = get_tokenizer(args.tokenizer)
    docs = _read(args.data, args.text_column, "training corpus")
    if args.heldout:
        held_docs = _read(args.heldout, args.text_column, "held-out corpus")
        dup = overlap(docs, held_docs)
        if dup:
            warnings.warn(f"{dup} held-out documents also occur in the training data", stacklevel=1)
        train, held = (per_document(d, tok, args.seq_len) for d in (docs, held_docs))
    else:
        seqs = per_document(docs, tok, args.seq_len)
        tr, ho = split_heldout(len(seqs), args.heldout_fraction, seed=cfg.seed)
        train, held = seqs.subset(tr), seqs.subset(ho)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(
        cfg, train, held, tok.vocab_size, out, tok.pad_id, tokenizer=tok.name, device=device
    )
    if args.resume:
        if trainer.resume():
            print(f"resumed at step {trainer.step}")
        else:
            print(f"nothing to resume in {out}: starting a new run")
    trainer.run(progress=not args.quiet)
    if trainer.step == cfg.steps and not trainer.updates:
        print(f"datarater train: every one of the {cfg.steps} meta-steps was skipped (non-finite "
              "losses or meta-gradients): no rater was learned; lower inner_lr or meta_lr, or "
              "check the data", file=sys.stderr)  # fmt: skip
        return 1
    if trainer.rank == 0:  # the one process that writes it
        print(f"rater written to {out / 'rater'}")
    return 0


def _config_path(name: str) -> Path:
    """A config file, or the name of one that ships with datarater (``paper``)."""
    from .training.trainer import CONFIGS

    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIGS / f"{name}.json"
    if "/" not in name and shipped.exists():
        return shipped
    known = sorted(p.stem for p in CONFIGS.glob("*.json"))
    raise SystemExit(f"datarater train: config file {path} does not exist (shipped: {known})")


def _dry_run(args: argparse.Namespace, cfg) -> int:
    """Estimate the run's memory and time on its device; exit 1 with advice if it won't fit."""
    import os

    from .data import get_tokenizer
    from .training.dry_run import estimate

    world = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    vocab = get_tokenizer(args.tokenizer).vocab_size
    est = estimate(cfg, vocab, args.seq_len, _device(args.device), world)
    print(est.report())
    return 0 if est.fits else 1


def _score(args: argparse.Namespace) -> int:
    import os

    from .data import get_tokenizer
    from .training import load_rater

    rater = load_rater(args.rater)
    tokenizer = get_tokenizer(args.tokenizer) if args.tokenizer else None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(args.device)
    with _ranks_wait_for_each_other(world):
        return _score_run(args, rater, tokenizer, device, rank, world)


@contextmanager
def _ranks_wait_for_each_other(world: int):
    """Under torchrun, a process that ends with an error makes torchrun stop all the others: a
    rank whose shard is bad would stop the rest mid-shard, at every rerun. So the ranks join a
    (CPU) process group and meet at a barrier before any of them returns, however long the
    slowest one scores."""
    import datetime
    import os

    import torch.distributed as dist

    # (processes started by hand with RANK and WORLD_SIZE but no rendezvous address just
    # split the shards, as before)
    joined = world > 1 and "MASTER_ADDR" in os.environ and not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    try:
        yield
    finally:
        if joined:  # also when this rank failed: the others finish their shards first
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def _score_run(args, rater, tokenizer, device, rank: int, world: int) -> int:
    from .scoring.score import score_files

    report = score_files(
        rater,
        args.data,
        args.text_column,
        args.out,
        aggregate=args.aggregate,
        batch_size=args.batch_size,
        tokenizer=tokenizer,
        device=device,
        rank=rank,
        world=world,
        progress=not args.quiet,
        precision=args.precision,
        compile=args.compile,
        attention=args.attention,
        skip_bad_rows=args.skip_bad_rows,
    )
    print(json.dumps(report, indent=1))
    if report["failed"]:
        for path, why in report["failed"].items():
            print(f"datarater score: {path}: {why}", file=sys.stderr)
        return 1
    return 0


def _filter(args: argparse.Namespace) -> int:
    from .scoring.filter_files import filter_files

    stats = filter_files(
        args.scored,
        args.out,
        args.rule,
        args.rho,
        batch=args.batch,
        seed=args.seed,
        source_column=args.source_column,
    )
    print(json.dumps(stats, indent=1))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from .scoring.analyze import write_report
    from .scoring.score import SCORE_COLUMN, count_scored, read_scored, score_texts
    from .training import load_rater

    cols = [args.text_column, SCORE_COLUMN] + ([args.source_column] if args.source_column else [])
    if args.max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {args.max_rows}")
    total = count_scored(args.scored)
    sample = None
    if total > args.max_rows:  # a uniform sample (seeded), not the first parts; only it is read
        sample = sorted(random.Random(0).sample(range(total), args.max_rows))
    data = read_scored(args.scored, cols, [args.text_column], rows=sample)
    rows = list(range(total)) if sample is None else sample
    texts = data[args.text_column]
    other = None
    if args.compare_rater:
        from .data import get_tokenizer
        from .scoring.score import recorded_settings

        # score as the folder was scored, or a rater compared with itself would look unstable
        how = recorded_settings(args.scored)
        options = {"aggregate": how.get("aggregate", "truncate")}
        if how.get("precision") in ("bf16", "fp32"):
            options["precision"] = how["precision"]
        tokenizer = get_tokenizer(args.tokenizer) if args.tokenizer else None
        other = score_texts(load_rater(args.compare_rater), texts, tokenizer, **options)
        other = (other, {"rater": str(args.compare_rater), **options})
    report = write_report(
        Path(args.out),
        texts,
        torch.tensor(data[SCORE_COLUMN]),
        data[args.source_column] if args.source_column else None,
        None if other is None else other[0],
        rows=rows,
        total=total,
        compared=None if other is None else other[1],
    )
    summary = {k: report[k] for k in ("n", "ols_r2", "lasso") if k in report}
    if "rank_correlation_with_other" in report:
        summary["rank_correlation_with_other"] = report["rank_correlation_with_other"]
    print(json.dumps(summary, indent=1))
    return 0


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError as e:
        raise ValueError(f"--rhos must be comma-separated fractions like 0.25,0.5 ({e})") from e
    if any(not 0.0 < v < 1.0 for v in values):
        raise ValueError(f"--rhos are discard fractions in (0, 1), got {text!r}")
    return values


def _kept_rows(folder: str, text_column: str) -> tuple[list[str], float]:
    """Rows a `datarater filter` kept, and the fraction it discarded."""
    stats_path = Path(folder) / "stats.json"
    if not stats_path.exists():
        raise FileNotFoundError(
            f"{stats_path} does not exist: run `datarater filter` (it writes stats.json last; "
            "a filter stopped before it finished leaves none)"
        )
    try:
        kept = float(json.loads(stats_path.read_text())["kept_fraction"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{stats_path}: no usable kept_fraction ({type(e).__name__}: {e})") from e
    if not 0.0 < kept <= 1.0:
        raise ValueError(f"{stats_path}: kept_fraction must be in (0, 1], got {kept}")
    from .scoring.score import read_scored

    texts = read_scored(folder, [text_column], [text_column])[text_column]
    if not texts:
        raise ValueError(f"{folder}: the filter kept no rows")
    return texts, 1.0 - kept


def _evaluate(args: argparse.Namespace) -> int:
    from .data import get_tokenizer
    from .evaluation import EvalConfig, run_evaluation
    from .scoring.score import SCORE_COLUMN, read_scored
    from .training import load_rater

    rater = load_rater(args.rater)
    tok = get_tokenizer(args.tokenizer or rater.tokenizer)
    cfg = EvalConfig(
        sizes=args.sizes.split(","),
        rhos=_fractions(args.rhos),
        steps=args.steps,
        eval_every=(
            max(1, min(25, args.steps // 10)) if args.eval_every is None else args.eval_every
        ),
        batch=args.batch,
        seq_len=rater.cfg.max_seq_len if args.seq_len is None else args.seq_len,
        seed=args.seed,
        repeats=args.repeats,
        baselines=not args.no_baselines,
    )
    data = read_scored(args.scored, [args.text_column, SCORE_COLUMN], [args.text_column])
    val_docs = _read(args.heldout, args.text_column, "validation corpus")
    given = _kept_rows(args.filtered, args.text_column) if args.filtered else None
    report = run_evaluation(
        data[args.text_column],
        data[SCORE_COLUMN],
        val_docs,
        args.out,
        tok,
        rater.cfg,
        cfg,
        given=given,
        given_name=args.filtered,
        progress=not args.quiet,
    )
    keys = ("best_rho", "net_compute_gain", "net_compute_gain_size", "max_net_compute_gain")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(f"report: {Path(args.out) / 'evaluation.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        print(f"datarater {args.command}: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"datarater {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"datarater {args.command}: interrupted; run the same command again to go on "
              "where it stopped", file=sys.stderr)  # fmt: skip
        return 130
    except OSError as e:  # disk full, a read-only folder, no permission: one line
        where = f" ({e.filename})" if e.filename else ""
        print(f"datarater {args.command}: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datarater", description="Meta-learned data curation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:  # --help shows the defaults
        return sub.add_parser(name, formatter_class=_Help, **kw)

    for add in (_demo_parser, _train_parser, _score_parser, _filter_parser, _analyze_parser,
                _evaluate_parser):  # fmt: skip
        add(command)
    return parser


def _demo_parser(command) -> None:
    demo = command("demo", help="meta-train a rater on a built-in corrupted corpus")
    demo.add_argument("--out", default="datarater-demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="a < 1 minute variant")
    demo.add_argument("--seed", type=int, default=0, help="seed of the corpus and of training")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="the inner models' compute: default bf16 on GPUs, fp32 on CPUs",
    )
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="start over; by default an interrupted demo with the same settings resumes",
    )
    demo.set_defaults(func=_demo)


def _train_parser(command) -> None:
    train = command("train", help="meta-train a rater on your corpus")
    train.add_argument(
        "--data",
        help="jsonl (also .gz/.bz2/.zst/.lz4), parquet, text file or folder, or a saved "
        "Hugging Face dataset (required but for --dry-run)",
    )
    train.add_argument("--text-column", default="text", help="column holding the documents")
    train.add_argument("--heldout", help="the outer (target) corpus; default: a split of --data")
    train.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of --data held out as target"
    )
    train.add_argument(
        "--out", help="output folder (rater, checkpoints, log); required but for --dry-run"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="estimate the peak memory per process and the time per meta-step on --device "
        "(one micro-batch measured), say whether it fits and what to change, and exit",
    )
    train.add_argument(
        "--processes",
        type=int,
        help="--dry-run: processes the population is spread over (torchrun's)",
    )
    train.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="cpu",
        help="inner LM and rater size: "
        + ", ".join(
            f"{k} d_model {v['d_model']} x {v['n_layers']} layers" for k, v in SIZES.items()
        )
        + "; not evaluate's --sizes, which name LM presets",
    )
    train.add_argument(
        "--steps", type=int, help="meta-steps; default 300 at --size cpu, else TrainConfig's"
    )
    train.add_argument("--population", type=int, help="inner models; default TrainConfig's")
    train.add_argument("--inner-steps", type=int, help="T per meta-step; default TrainConfig's")
    train.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per sequence: each document gives its first window of this length",
    )
    train.add_argument("--tokenizer", help="a local tokenizers JSON file (default: bytes)")
    train.add_argument(
        "--config", help="JSON file of TrainConfig settings, or a shipped one's name: paper"
    )
    train.add_argument("--seed", type=int, help="default TrainConfig's")
    train.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        help="the inner models' compute (parameters and meta-gradients stay float32); "
        "default bf16 on GPUs, fp32 on CPUs",
    )
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--device", help="default: cuda if available, else cpu")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)


def _score_parser(command) -> None:
    score = command("score", help="score a corpus with a trained rater")
    score.add_argument("--rater", required=True, help="a rater folder written by train")
    score.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="jsonl (also .gz/.bz2/.zst/.lz4), parquet or Arrow files, globs, folders, or a "
        "saved Hugging Face dataset; each file is one shard",
    )
    score.add_argument("--text-column", default="text", help="column holding the documents")
    score.add_argument("--out", required=True, help="output folder of parquet shards")
    score.add_argument(
        "--aggregate",
        choices=["truncate", "mean", "token_weighted"],
        default="truncate",
        help="for documents longer than the rater's context",
    )
    score.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    score.add_argument("--tokenizer", help="default: the tokenizer recorded with the rater")
    score.add_argument("--device", help="default: cuda if available, else cpu")
    score.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32", "fp8"],
        default="auto",
        help="auto: bf16 on GPUs, fp32 on CPUs; fp8: the blocks' linear layers in FP8 (GPUs "
        "of compute capability >= 8.9; allowed on CPUs as a slow reference path)",
    )
    score.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the rater, batches padded to a few fixed shapes (slow first "
        "batches while it compiles; for large corpora)",
    )
    score.add_argument(
        "--attention",
        choices=["sdpa", "triton"],  # models.transformer.ATTENTION_BACKENDS (no torch import here)
        default="sdpa",
        help="sdpa: PyTorch's fused attention; triton: datarater's Triton kernel (GPUs only)",
    )
    score.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="leave out rows whose text is missing, not a string or unparsable (counted per "
        "shard in the report and its .done marker) instead of failing their shard",
    )
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=_score)


def _filter_parser(command) -> None:
    filt = command("filter", help="keep the best-scored rows of a scored corpus")
    filt.add_argument("--scored", required=True, help="a folder written by `datarater score`")
    filt.add_argument("--out", required=True, help="folder for the kept rows and stats.json")
    filt.add_argument(
        "--rule",
        choices=["topk", "paccept", "quantile"],
        default="topk",
        help="batch-level top-K, per-row P_accept, or a global quantile",
    )
    filt.add_argument("--rho", type=float, default=0.5, help="discard fraction")
    filt.add_argument("--batch", type=int, default=64, help="nominal batch N (topk, paccept)")
    filt.add_argument("--seed", type=int, default=0, help="of paccept's draws")
    filt.add_argument("--source-column", help="report the kept fraction per value of it")
    filt.set_defaults(func=_filter)


def _analyze_parser(command) -> None:
    ana = command("analyze", help="what the rater learned: heuristics, extremes, stability")
    ana.add_argument("--scored", required=True, help="a folder written by `datarater score`")
    ana.add_argument("--out", required=True, help="folder for analysis.json and plots")
    ana.add_argument("--text-column", default="text", help="column holding the documents")
    ana.add_argument("--source-column", help="histograms and mean score per source")
    ana.add_argument(
        "--compare-rater",
        help="another rater folder, or a training checkpoint (run/checkpoints/step-N), for the "
        "rank correlation of scores",
    )
    ana.add_argument(
        "--max-rows", type=int, default=20000, help="a uniform sample of this many rows, if more"
    )
    ana.add_argument("--tokenizer", help="for --compare-rater (default: the one it recorded)")
    ana.set_defaults(func=_analyze)


def _evaluate_parser(command) -> None:
    ev = command(
        "evaluate", help="train fresh LMs on filtered vs raw data and report the compute saved"
    )
    ev.add_argument("--scored", required=True, help="a folder written by `datarater score`")
    ev.add_argument("--rater", required=True, help="the rater that scored it (for its FLOPs)")
    ev.add_argument(
        "--heldout",
        required=True,
        help="the target corpus for validation NLL; keep it disjoint from the rater's outer data",
    )
    ev.add_argument("--filtered", help="also train on a folder written by `datarater filter`")
    ev.add_argument(
        "--out",
        required=True,
        help="folder for evaluation.json/.md and plots; finished runs are kept in its runs/, "
        "so the same command after a crash trains only what is left",
    )
    ev.add_argument("--text-column", default="text", help="column holding the documents")
    ev.add_argument(
        "--sizes",
        default="tiny,small",
        help="model presets, smallest first (larger than the rater, or scoring eats the gain): "
        "toy, tiny, small, 17m, 50m, rater-70m, 125m, 435m",
    )
    ev.add_argument("--rhos", default="0.1,0.25,0.5,0.75,0.9", help="discard fractions to sweep")
    ev.add_argument("--steps", type=int, default=300, help="training steps per run")
    ev.add_argument(
        "--eval-every",
        type=int,
        help="steps between validation points; default: steps / 10, at most 25",
    )
    ev.add_argument("--batch", type=int, default=16, help="sequences per LM training step")
    ev.add_argument("--seq-len", type=int, help="default: the rater's context")
    ev.add_argument("--tokenizer", help="default: the rater's tokenizer")
    ev.add_argument("--seed", type=int, default=0, help="of the splits and the first run")
    ev.add_argument("--repeats", type=int, default=1, help="seeds per run, curves averaged")
    ev.add_argument("--no-baselines", action="store_true", help="skip the perplexity filters")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)


if __name__ == "__main__":
    sys.exit(main())
