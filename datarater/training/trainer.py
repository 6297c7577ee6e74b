"""Meta-training a rater with a population of inner language models (design.md section 1).

Each meta-step, every inner model runs ``meta_step`` over a window of T inner steps (which also
trains it on the rater-weighted loss) and proposes a rater update through its own meta-Adam
(decoupled weight decay, linear warm-up, global-norm clipping); the proposals are averaged and
applied. Inner models are re-initialised on staggered schedules so that the population always
spans early and late training. The whole state is checkpointed atomically and a resumed run
ends with the same rater, bit for bit on the CPU, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import numbers
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data.tokens import Sequences
from ..io import atomic_write, atomic_write_text, digest, inside
from ..meta import InnerState, meta_step, weighted_steps
from ..models import PRESETS, CausalLM, Rater, TransformerConfig
from ..optim import Adam
from ..runs import RunFolder
from .checkpoint import flatten, load_checkpoint, save_checkpoint, unflatten
from .curves import plot_training

PRECISIONS = ("auto", "bf16", "fp32")
CORPUS_SET = ("vocab_size", "max_seq_len")  # set by the tokenizer and --seq-len, not presets
CONFIGS = Path(__file__).with_name("configs")  # named training configurations (--config NAME)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """meta_step's compute_dtype for a TrainConfig.precision on this device."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with every checkpoint."""

    steps: int = 300
    population: int = 2
    inner_steps: int = 2
    steps_between: int = 0  # plain rater-weighted inner steps after each meta-step
    inner_batch: int = 16
    outer_batch: int = 16
    lifetime: int = 100
    inner_lr: float = 3e-3
    inner_weight_decay: float = 0.0
    inner_clip: float | None = 1.0
    meta_lr: float = 1e-3
    meta_weight_decay: float = 0.1
    meta_warmup: int = 100
    meta_decay: str = "constant"  # or "cosine": down to 10 % of meta_lr at the last step
    meta_clip: float = 0.01
    tau: float = 1.0
    micro_batch_size: int | None = None
    precision: str = "auto"  # the inner models' compute: bf16 on GPUs, fp32 on CPUs; or named
    remat: str | None = "auto"  # meta_step's: block rematerialisation on GPUs
    checkpoint_every: int = 50
    seed: int = 0
    lm: dict = field(default_factory=lambda: dict(d_model=64, n_layers=2, n_heads=2))
    rater: dict = field(default_factory=lambda: dict(d_model=64, n_layers=2, n_heads=2))

    def __post_init__(self) -> None:
        """Every setting checked for its type and range here, so that a wrong one in a
        ``--config`` file is named before any data is read (a float step count never met
        ``step == steps``; an infinite learning rate skipped every meta-step)."""

        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:  # numpy's integers too (stored as int: the JSON must hold it)
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def take(name: str, kind: type, low, above: bool = False, none: bool = False) -> None:
            """Check ``name`` is a ``kind`` (>= ``low``, or > with ``above``; None allowed
            with ``none``) and store it as a plain int or float."""
            value = getattr(self, name)
            if none and value is None:
                return
            ok = is_int(value) if kind is int else is_number(value)
            if ok and low is not None:
                ok = value > low if above else value >= low
            if not ok:
                what = "an int" if kind is int else "a finite number"
                what += "" if low is None else f" {'>' if above else '>='} {low}"
                raise bad(name, f"None or {what}" if none else what)
            setattr(self, name, kind(value))

        for name in ("steps", "population", "inner_steps", "inner_batch", "outer_batch",
                     "lifetime", "checkpoint_every"):  # fmt: skip
            take(name, int, 1)
        for name in ("steps_between", "meta_warmup"):
            take(name, int, 0)
        take("seed", int, None)
        for name in ("inner_lr", "meta_lr", "tau"):
            take(name, float, 0, above=True)
        for name in ("inner_weight_decay", "meta_weight_decay"):
            take(name, float, 0)
        for name in ("inner_clip", "meta_clip"):  # None: no clipping
            take(name, float, 0, above=True, none=True)
        take("micro_batch_size", int, 1, none=True)
        if self.meta_decay not in ("constant", "cosine"):
            raise bad("meta_decay", "'constant' or 'cosine'")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}")
        if self.remat not in ("auto", "block", None):
            raise bad("remat", "'auto', 'block' or None")
        shape_keys = set(TransformerConfig.__dataclass_fields__)
        for name in ("lm", "rater"):
            value = getattr(self, name)
            if isinstance(value, str) and value in PRESETS:  # a preset's shape
                value = {k: v for k, v in PRESETS[value].to_dict().items() if k not in CORPUS_SET}
                setattr(self, name, value)
            if not isinstance(value, dict) or set(value) - shape_keys:
                raise bad(name, f"a preset name from {sorted(PRESETS)} or a dict of model "
                          f"settings from {sorted(shape_keys)}")  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"training settings must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**d)


def _model_config(overrides: dict, vocab: int, seq_len: int) -> TransformerConfig:
    return TransformerConfig(**{"vocab_size": vocab, "max_seq_len": seq_len, **overrides})


class Trainer:
    """Population meta-training of a rater on ``train`` with held-out (outer) data ``heldout``."""

    def __init__(
        self,
        config: TrainConfig,
        train: Sequences,
        heldout: Sequences,
        vocab_size: int,
        out: Path | str | None = None,
        pad_id: int | None = None,
        tokenizer: str = "bytes",
        device: str | torch.device = "cpu",
    ):
        """``device``: where the rater, the inner models and the batches live; models are
        initialised on the CPU first, so a seed gives the same run on any device (up to
        floating-point order). Checkpoints hold CPU tensors and resume on any device."""
        if len(train) < config.inner_batch or len(heldout) < config.outer_batch:
            raise ValueError(
                f"not enough sequences: {len(train)} training (need >= inner_batch = "
                f"{config.inner_batch}) and {len(heldout)} held-out (need >= outer_batch = "
                f"{config.outer_batch})"
            )
        self.cfg, self.train, self.heldout = config, train, heldout
        self.out = Path(out) if out is not None else None
        # the folder's one writer (a command that writes a training run into its own folder,
        # as the demo does, has claimed it already)
        self.folder = RunFolder.join(self.out, "train") if self.out is not None else None
        seq_len = train.input_ids.shape[1]
        self.lm_cfg = _model_config(config.lm, vocab_size, seq_len)
        self.rater_cfg = _model_config(config.rater, vocab_size, seq_len)
        self.pad_id, self.tokenizer = pad_id, tokenizer
        self.device = torch.device(device)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.rater = Rater(self.rater_cfg, pad_id=pad_id).to(self.device)
        self.template = CausalLM(self.lm_cfg).to(self.device)
        self.inner_opt = Adam(
            config.inner_lr, weight_decay=config.inner_weight_decay, clip_norm=config.inner_clip
        )
        # Under torchrun, inner models are spread over ranks (model p lives on rank p % world);
        # each has its own data stream, so a model draws the same batches wherever it runs.
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.mine = [p for p in range(config.population) if p % self.world == self.rank]
        self.gens = {
            p: torch.Generator().manual_seed(config.seed * 7919 + p + 1) for p in self.mine
        }
        self.step = 0
        self.resets = [0] * config.population
        self.updates = 0  # meta-steps that moved the rater (all skipped: it learned nothing)
        self.population = {p: self._fresh(p) for p in self.mine}
        n = sum(p.numel() for p in self.rater.parameters())
        self.meta_state = {
            p: {
                "exp_avg": {"flat": torch.zeros(n, device=self.device)},
                "exp_avg_sq": {"flat": torch.zeros(n, device=self.device)},
            }
            for p in self.mine
        }
        self.history: list[dict] = []
        self._digest: str | None = None  # of the data, when first needed

    # -- population ------------------------------------------------------------------------
    def _fresh(self, p: int) -> InnerState:
        """A newly initialised inner model; its seed depends only on (seed, p, reset count)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed * 1_000_003 + p * 10_007 + self.resets[p] + 17)
            return InnerState.init(CausalLM(self.lm_cfg).to(self.device), self.inner_opt)

    def _offset(self, p: int) -> int:
        return p * self.cfg.lifetime // self.cfg.population

    def _draw(self, p: int, data: Sequences, n: int) -> dict[str, Tensor]:
        idx = torch.randint(0, len(data), (n,), generator=self.gens[p])  # CPU: any device
        return {k: v.to(self.device, non_blocking=True) for k, v in data.batch(idx).items()}

    def _meta_lr(self) -> float:
        cfg = self.cfg
        lr = cfg.meta_lr * min(1.0, (self.step + 1) / max(1, cfg.meta_warmup))
        if cfg.meta_decay == "cosine" and self.step >= cfg.meta_warmup:
            done = (self.step - cfg.meta_warmup) / max(1, cfg.steps - cfg.meta_warmup)
            lr *= 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        return lr

    def _flat_rater(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.rater.parameters()])

    def _set_rater(self, flat: Tensor) -> None:
        with torch.no_grad():
            i = 0
            for p in self.rater.parameters():
                p.copy_(flat[i : i + p.numel()].view_as(p))
                i += p.numel()

    # -- one meta-step ---------------------------------------------------------------------
    def meta_update(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        phi = self._flat_rater()
        meta_opt = Adam(
            self._meta_lr(), weight_decay=cfg.meta_weight_decay, clip_norm=cfg.meta_clip
        )
        proposals, outer, inner, norms, entropy, skipped = {}, [], [], [], [], 0
        for p in self.mine:
            if (self.step + self._offset(p)) % cfg.lifetime == 0 and self.step > 0:
                self.resets[p] += 1
                self.population[p] = self._fresh(p)
            batches = [self._draw(p, self.train, cfg.inner_batch) for _ in range(cfg.inner_steps)]
            self.rater.zero_grad(set_to_none=True)
            res = meta_step(
                self.rater,
                self.template,
                self.population[p],
                batches,
                self._draw(p, self.heldout, cfg.outer_batch),
                optimizer=self.inner_opt,
                tau=cfg.tau,
                micro_batch_size=cfg.micro_batch_size,
                on_nonfinite="skip",
                compute_dtype=compute_dtype(cfg.precision, self.device),
                remat=cfg.remat,
            )
            self.population[p] = res.state
            if cfg.steps_between:
                more = [
                    self._draw(p, self.train, cfg.inner_batch) for _ in range(cfg.steps_between)
                ]
                self.population[p] = weighted_steps(
                    self.rater,
                    self.template,
                    res.state,
                    more,
                    optimizer=self.inner_opt,
                    tau=cfg.tau,
                    micro_batch_size=cfg.micro_batch_size,
                    compute_dtype=compute_dtype(cfg.precision, self.device),
                )
            if res.skipped:
                skipped += 1
                norms.append(None)  # (one entry per inner model of this rank, in order)
                continue
            grad = torch.cat(
                [
                    q.grad.reshape(-1)
                    if q.grad is not None
                    else torch.zeros(q.numel(), device=self.device)
                    for q in self.rater.parameters()
                ]
            )
            new, self.meta_state[p] = meta_opt.update(
                {"flat": phi}, {"flat": grad}, self.meta_state[p], self.step + 1
            )
            proposals[p] = new["flat"] - phi
            outer.append(res.outer_loss)
            inner.append(sum(res.inner_losses) / len(res.inner_losses))
            norms.append(res.meta_grad_norm)
            entropy.append(
                float(sum(-(w * w.clamp_min(1e-30).log()).sum() for w in res.weights))
                / len(res.weights)
            )
        total, count = self._sum_proposals(proposals, phi)
        if count:
            self._set_rater(phi + total / count)
            self.updates += 1
        self.step += 1
        seconds = time.perf_counter() - t0
        tokens = (  # this process's inner models, their weighted steps between included
            len(self.mine)
            * ((cfg.inner_steps + cfg.steps_between) * cfg.inner_batch + cfg.outer_batch)
            * self.train.input_ids.shape[1]
        )
        row = {
            "step": self.step,
            "outer_loss": _mean(outer),
            "inner_loss": _mean(inner),
            "weight_entropy": _mean(entropy),
            "meta_grad_norms": norms,
            "skipped": skipped,
            "meta_lr": meta_opt.lr,
            "tokens_per_s": tokens / seconds,
        }
        self.history.append(row)
        return row

    def _sum_proposals(self, proposals: dict[int, Tensor], phi: Tensor) -> tuple[Tensor, int]:
        """Sum of all models' proposals in model order (the same bits on 1 or many ranks)."""
        if self.world > 1:
            dist = torch.distributed
            # NCCL gathers device tensors, gloo CPU ones
            comm = phi.device if dist.get_backend() == "nccl" else torch.device("cpu")
            k = max(len(range(r, self.cfg.population, self.world)) for r in range(self.world))
            mine = torch.zeros(k, phi.numel() + 2, dtype=phi.dtype, device=comm)
            for i, p in enumerate(self.mine):
                mine[i, 0] = p
                if p in proposals:
                    mine[i, 1], mine[i, 2:] = 1.0, proposals[p]
            for i in range(len(self.mine), k):
                mine[i, 0] = -1
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
            rows = torch.cat(parts).to(phi.device)
            keep = rows[:, :2].tolist()  # one transfer, not one per row
            proposals = {int(a): r[2:] for (a, ok), r in zip(keep, rows) if a >= 0 and ok > 0}
        total = torch.zeros_like(phi)
        for p in sorted(proposals):
            total = total + proposals[p]
        return total, len(proposals)

    # -- the loop, checkpoints, export -------------------------------------------------------
    def run(self, progress: bool = True, stop_after: int | None = None) -> Rater:
        """Train up to ``cfg.steps`` (or ``stop_after`` more steps), checkpointing as it goes."""
        from tqdm import tqdm

        last = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        bar = tqdm(
            total=self.cfg.steps, initial=self.step, desc="meta-training", disable=not progress
        )
        while self.step < last:
            row = self.meta_update()
            bar.set_postfix(
                outer=f"{row['outer_loss']:.3f}", entropy=f"{row['weight_entropy']:.2f}"
            )
            bar.update(1)
            if self.out is not None:
                with open(self._log_path(), "a") as f:
                    f.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save()
        bar.close()
        if self.out is not None and self.step == self.cfg.steps and self.rank == 0:
            if self.updates:  # (a rater that never moved is not a result)
                self.export(self.out / "rater")
        return self.rater

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything a resume needs, as CPU tensors (a checkpoint resumes on any device)."""
        t = {f"rater.{k}": v for k, v in self.rater.state_dict().items()}
        for p, st in self.population.items():
            t.update(flatten(f"pop.{p}.params", st.params))
            t.update(flatten(f"pop.{p}.opt", st.opt_state))
            t.update(flatten(f"meta.{p}", self.meta_state[p]))
            t[f"rng.{p}"] = self.gens[p].get_state()
        return {k: v.detach().cpu() for k, v in t.items()}

    def save(self) -> Path:
        meta = {
            "step": self.step,
            "config": asdict(self.cfg),
            "resets": self.resets,
            "updates": self.updates,
            "inner_steps_done": {str(p): st.step for p, st in self.population.items()},
            "lm": self.lm_cfg.to_dict(),
            "rater": self.rater_cfg.to_dict(),
            "pad_id": self.pad_id,
            "tokenizer": self.tokenizer,
            "world": self.world,
            "data": self._data_digest(),
            "history": self.history,
        }
        saved = save_checkpoint(self._ckpt_dir(), self.step, self.state_tensors(), meta)
        self._plot()
        return saved

    def _plot(self) -> None:
        """``meta_training.png`` beside the log, redrawn at every checkpoint (a picture is
        no reason to fail a run: a plotting error is a warning)."""
        if not self.history:
            return
        name = self._plot_name()
        title = "Meta-training" + (
            f" (rank {self.rank}: inner models {self.mine})" if self.world > 1 else ""
        )
        try:
            plot_training(self.history, self.out / name, title, self.cfg.inner_batch, self.mine)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not draw {name}: {e!r}", stacklevel=2)

    def _plot_name(self) -> str:
        return "meta_training.png" if self.world == 1 else f"meta_training.rank{self.rank}.png"

    def _ckpt_dir(self) -> Path:
        root = self.out / "checkpoints"
        return root if self.world == 1 else root / f"rank-{self.rank}"

    def start_over(self) -> None:
        """Forget an earlier run in ``out``: this rank's checkpoints, log and plot, and (rank
        0) the exported rater, so that nothing of it passes for this run's."""
        if self.out is None:
            return
        shutil.rmtree(self._ckpt_dir(), ignore_errors=True)
        self._log_path().unlink(missing_ok=True)
        (self.out / self._plot_name()).unlink(missing_ok=True)
        if self.rank == 0:
            shutil.rmtree(self.out / "rater", ignore_errors=True)

    def _data_digest(self) -> str:
        """SHA-256 of the training and held-out token ids: a resumed run must read the same.
        Computed once (the data does not change during a run)."""
        if self._digest is None:
            self._digest = digest(self.train.input_ids, self.heldout.input_ids)
        return self._digest

    def _check_layout(self) -> None:
        """A run's checkpoints are per process under torchrun (``rank-r/``): resuming needs
        the same number of processes, each with its checkpoint of the same step; otherwise
        ranks would resume at different steps, or some not at all."""
        root = self.out / "checkpoints"
        latest = {
            int(p.name.split("-", 1)[1]): (p / "LATEST").read_text().strip()
            for p in root.glob("rank-*")
            if (p / "LATEST").exists()
        }
        single = (root / "LATEST").exists()
        if self.world == 1 and latest:
            raise ValueError(
                f"{self.out}: its checkpoints were written under torchrun (ranks "
                f"{sorted(latest)}); resume with as many processes, or use a new --out"
            )
        if self.world > 1 and single:
            raise ValueError(
                f"{self.out}: its checkpoints were written by one process, and this run has "
                f"{self.world}: resume with one, or use a new --out"
            )
        if (
            self.world > 1
            and latest
            and (set(latest) != set(range(self.world)) or len(set(latest.values())) > 1)
        ):
            found = ", ".join(f"rank {r}: {step}" for r, step in sorted(latest.items()))
            raise ValueError(
                f"{self.out}: the ranks' checkpoints do not fit a run of {self.world} processes "
                f"({found}): resumed, they would run out of step; use a new --out"
            )

    def resume(self) -> bool:
        """Load the newest checkpoint under ``out`` if there is one; True if it did."""
        if self.out is not None:
            self._check_layout()
        found = None if self.out is None else load_checkpoint(self._ckpt_dir())
        if found is None:
            if self.out is not None:
                self._trim_log()  # a crash before the first checkpoint: start the log again
            return False
        tensors, meta = found
        if meta.get("tokenizer", self.tokenizer) != self.tokenizer:
            raise ValueError(
                f"{self.out}: the checkpoint was written with tokenizer {meta['tokenizer']}, "
                f"not {self.tokenizer}; resume with the same tokenizer or use a new --out"
            )
        # the settings first (the held-out split depends on the seed, so a changed seed would
        # otherwise read as other data); the model dicts as written are left out: a partial
        # one merged with a --size reads differently from older versions, and the shapes they
        # give are compared below
        then = {k: v for k, v in meta["config"].items() if k not in ("lm", "rater")}
        now = {k: v for k, v in asdict(self.cfg).items() if k not in ("lm", "rater")}
        if then != now:
            diff = [
                f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                for k in sorted(set(then) | set(now))
                if then.get(k) != now.get(k)
            ]
            raise ValueError(
                f"{self.out}: the checkpoint was written with other settings ({'; '.join(diff)}); "
                "resume with the same configuration or use a new --out (the meta learning "
                "rate schedule depends on the number of steps, so a run cannot be lengthened)"
            )
        if meta.get("world", self.world) != self.world:
            raise ValueError(
                f"{self.out}: the checkpoint was written by {meta['world']} process(es), and "
                f"this run has {self.world}: resume with {meta['world']}, or use a new --out"
            )
        for key, now_value in (
            ("lm", self.lm_cfg.to_dict()),
            ("rater", self.rater_cfg.to_dict()),
            ("pad_id", self.pad_id),
            ("data", self._data_digest()),
        ):
            if key in meta and meta[key] != now_value:
                what = "training or held-out data" if key == "data" else f"{key} settings"
                raise ValueError(
                    f"{self.out}: the checkpoint was written for other {what} "
                    f"({key}: {meta[key]!r} then, {now_value!r} now)"[:400]
                    + "; resume with the same data and settings or use a new --out"
                )
        self.rater.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("rater.")})
        self.step, self.resets, self.history = meta["step"], meta["resets"], meta["history"]
        self.updates = meta["updates"]
        for key, done in meta["inner_steps_done"].items():
            p = int(key)
            like = self._fresh(p)
            self.population[p] = InnerState(
                _to(unflatten(f"pop.{p}.params", tensors, like.params), self.device),
                dict(like.buffers),
                _to(unflatten(f"pop.{p}.opt", tensors, like.opt_state), self.device),
                done,
            )
            self.meta_state[p] = _to(
                unflatten(f"meta.{p}", tensors, self.meta_state[p]), self.device
            )
            self.gens[p].set_state(tensors[f"rng.{p}"])
        self._trim_log()
        return True

    def _log_path(self) -> Path:
        return self.out / ("log.jsonl" if self.world == 1 else f"log.rank{self.rank}.jsonl")

    def _trim_log(self) -> None:
        """Drop the log rows of steps after the checkpoint: a crashed run logged them, the
        resumed run logs them again."""
        path = self._log_path()
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut short by the crash
                continue
            if row.get("step", 0) <= self.step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(x + "\n" for x in kept))

    def export(self, folder: Path) -> None:
        """The rater alone, as ``save_rater`` writes it."""
        save_rater(self.rater, folder, step=self.step, tokenizer=self.tokenizer)


def save_rater(
    rater: Rater, folder: Path | str, step: int = 0, tokenizer: str | None = None
) -> None:
    """``rater.safetensors`` + ``config.json``: what scoring needs, the tokenizer included (a
    tokenizer file is copied into the folder, so the folder can move).

    The config also travels inside the safetensors metadata, so weights and config can never
    be paired wrongly: each file is replaced atomically, and a reader checks that they agree.
    """

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or getattr(rater, "tokenizer", None) or "bytes"
    if tokenizer != "bytes":
        source = Path(tokenizer)
        if source.resolve() != (folder / "tokenizer.json").resolve():
            shutil.copyfile(source, folder / "tokenizer.json")
        tokenizer = "tokenizer.json"  # relative to the folder
    meta = {
        "rater": rater.cfg.to_dict(),
        "pad_id": rater.pad_id,
        "step": step,
        "tokenizer": tokenizer,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in rater.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"datarater": json.dumps(meta)})

    atomic_write(folder / "rater.safetensors", write)
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=1))


def load_rater(folder: Path | str) -> Rater:
    """A rater written by ``save_rater`` (or ``datarater train``), in eval mode;
    ``rater.tokenizer`` names the tokenizer it was trained with. Every inconsistency is an
    error naming the file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "rater.safetensors"
    if (folder / "meta.json").exists() and (folder / "tensors.safetensors").exists():
        return _rater_from_checkpoint(folder)
    if not cfg_path.exists() and (folder / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{folder} is a training run folder: its rater is {folder / 'rater'} (once the run "
            f"has finished), its checkpoints are {folder / 'checkpoints'}/step-*"
        )
    if not cfg_path.exists() and (folder / "LATEST").is_file():
        latest = (folder / "LATEST").read_text().strip()
        raise FileNotFoundError(
            f"{folder} is a checkpoints folder: name one of its checkpoints, such as the "
            f"newest, {folder / latest}"
        )
    for path in (cfg_path, weights):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist (is {folder} a rater folder written by `datarater train`?)"
            )
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = TransformerConfig(**meta["rater"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: not a rater config ({type(e).__name__}: {e})") from e
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            stored = (f.metadata() or {}).get("datarater")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from e
    if stored is not None:  # the weights carry their own config: it is the authority
        stored = json.loads(stored)
        keys = ("rater", "pad_id", "tokenizer")
        if any(stored.get(k) != meta.get(k) for k in keys):
            raise ValueError(
                f"{weights}: weights do not match {cfg_path} (it was written with another "
                "config); the two files come from different runs"
            )
    with torch.device("meta"):  # the config's shapes, checked before anything is allocated
        expected = {
            k: v.shape for k, v in Rater(cfg, pad_id=meta.get("pad_id")).state_dict().items()
        }
    odd = sorted(set(expected) ^ set(state))
    odd += [k for k in expected if k in state and expected[k] != state[k].shape]
    if odd:
        raise ValueError(
            f"{weights}: weights do not match {cfg_path} (e.g. {odd[:3]}); "
            "the two files come from different runs or configs"
        )
    rater = Rater(cfg, pad_id=meta.get("pad_id"))
    tokenizer = meta.get("tokenizer", "bytes")
    if tokenizer != "bytes":  # a file the folder ships, never one elsewhere
        tokenizer = str(inside(folder, tokenizer, f"{cfg_path}: the tokenizer"))
    rater.tokenizer = tokenizer
    rater.load_state_dict(state)
    return rater.eval()  # loaded to score; rater.train() to meta-train it further


def _rater_from_checkpoint(folder: Path) -> Rater:
    """The rater of a training checkpoint (``checkpoints/step-NNNNNN``), in eval mode."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "meta.json").read_text())
        rater = Rater(TransformerConfig(**meta["rater"]), pad_id=meta.get("pad_id"))
        state = {
            k[len("rater.") :]: v
            for k, v in load_file(str(folder / "tensors.safetensors")).items()
            if k.startswith("rater.")
        }
        rater.load_state_dict(state)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder}: not a readable training checkpoint ({e})") from e
    rater.tokenizer = meta.get("tokenizer", "bytes")
    return rater.eval()


def _to(tree: dict, device: torch.device) -> dict:
    """A nested dict of tensors moved to ``device``."""
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) for k, v in tree.items()}


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _json_safe(value):
    """``value`` with every non-finite float as null: strict JSON readers refuse NaN (the
    mean over no inner model, on a rank that holds none, or a step where all were skipped)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
