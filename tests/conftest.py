"""Shared fixtures: tiny models and batches, made fresh from a seed (no downloads)."""

from __future__ import annotations

import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# Without a GPU, Triton kernels run on the CPU through the interpreter (chosen before triton
# is imported); with one they are compiled, as users run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from datarater.models import CausalLM, Rater, TransformerConfig

VOCAB = 29  # odd on purpose


def tiny_lm(dtype=torch.float64, vocab=VOCAB, seed=0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    return CausalLM(cfg).to(dtype)


def tiny_rater(dtype=torch.float64, vocab=VOCAB, seed=1) -> Rater:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab, max_seq_len=16, d_model=8, n_layers=1, n_heads=2)
    rater = Rater(cfg).to(dtype)
    with torch.no_grad():  # scores that differ noticeably, so that weights are far from uniform
        rater.head.weight.normal_(0, 1.0)
    return rater


class UserLM(nn.Module):
    """A language model a user might write: buffers, no attention, returns an object."""

    def __init__(self, vocab=VOCAB, d=12, max_len=16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("pos", torch.randn(max_len, d) * 0.5)
        causal = torch.tril(torch.ones(max_len, max_len))
        self.register_buffer("avg", causal / causal.sum(1, keepdim=True))

    def forward(self, ids):
        n = ids.shape[1]
        h = self.emb(ids) + self.pos[:n]
        h = h + self.avg[:n, :n] @ torch.tanh(self.mix(h))
        return SimpleNamespace(logits=self.out(h))


def user_lm(dtype=torch.float64, seed=0) -> UserLM:
    torch.manual_seed(seed)
    return UserLM().to(dtype)


def make_batches(
    steps: int,
    batch: int = 5,
    length: int = 9,
    masked: bool = False,
    seed: int = 3,
    vocab: int = VOCAB,
):
    gen = torch.Generator().manual_seed(seed)

    def one():
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        out = {"input_ids": ids}
        if masked:
            mask = (torch.rand(batch, length, generator=gen) > 0.3).float()
            mask[:, 1] = 1.0  # every row keeps at least one target
            out["loss_mask"] = mask
        return out

    return [one() for _ in range(steps)], one()


def byte_rater(seed: int = 0, d: int = 32, layers: int = 2, ctx: int = 64) -> Rater:
    """A rater over byte tokens (258: bytes, BOS, padding) whose scores spread enough for
    ranks to mean something: the scoring tests' model."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=258, max_seq_len=ctx, d_model=d, n_layers=layers, n_heads=2)
    rater = Rater(cfg, pad_id=257).eval()
    with torch.no_grad():
        rater.head.weight.normal_(0, 1.0)
    return rater


def varied_texts(seed: int, n: int = 64, soup: int = 90, words: int = 30) -> list[str]:
    """Word salads and symbol soup of many lengths (up to ``soup`` characters and ``words``
    words): some longer than a small rater's context."""
    import random

    rng = random.Random(seed)
    vocab = "the of and data model rater score token corpus filter quality ZEBRA 42 ###".split()
    texts = []
    for i in range(n):
        if i % 3 == 0:
            texts.append("".join(chr(rng.randint(33, 126)) for _ in range(rng.randint(1, soup))))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, words))))
    return texts


def gpu_meta_grads() -> list[torch.Tensor]:
    """The rater's meta-gradient from ``meta_step`` on the GPU, mixed mode then reverse mode,
    on the tiny models in float32 (the GPU tests compare the two)."""
    import datarater as dr

    model, rater = tiny_lm(torch.float32).cuda(), tiny_rater(torch.float32).cuda()
    inner, outer = make_batches(3, batch=8, masked=True)
    inner = [{k: v.cuda() for k, v in b.items()} for b in inner]
    outer = {k: v.cuda() for k, v in outer.items()}
    opt = dr.optim.Adam(1e-2, clip_norm=1.0)
    state = dr.InnerState.init(model, opt)
    grads = []
    for mode in ("mixed", "reverse"):
        rater.zero_grad(set_to_none=True)
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode=mode)
        grads.append(torch.cat([p.grad.flatten() for p in rater.parameters()]))
    return grads


def torchrun(*args: str, procs: int = 2) -> list[str]:
    """A ``torchrun`` command line for ``procs`` local processes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(procs),
        "--master-port",
        str(port),
        *args,
    ]


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``datarater demo --quick`` run once per session: its folder and what it printed."""
    import contextlib
    import io

    from datarater.cli import main

    out = tmp_path_factory.mktemp("quick_demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--quick", "--quiet", "--out", str(out)])
    return SimpleNamespace(out=out, code=code, printed=printed.getvalue())


@pytest.fixture
def batches():
    return make_batches(2)


def pytest_terminal_summary(terminalreporter):
    """Show the compile reports (CUDA registers and spills, Triton for sm_90) in CI's output."""
    from . import test_cuda_sources, test_triton_sources

    for line in test_cuda_sources.REPORT + test_triton_sources.REPORT:
        terminalreporter.write_line(line)
