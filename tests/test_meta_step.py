"""meta_step: mixed mode equals the reverse-over-reverse oracle, and both equal finite
differences of the whole unrolled computation, done independently with torch.optim."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datarater as dr
from datarater import optim

from .conftest import VOCAB, make_batches, tiny_lm, tiny_rater, user_lm

preflight_module = importlib.import_module("datarater.meta.preflight")

TAU = 0.7
CLIP = 0.05  # small enough that clipping is active in every step

OPTIMIZERS = {
    "sgd": (optim.SGD(0.5), lambda p: torch.optim.SGD(p, lr=0.5), None),
    "sgd_clip": (optim.SGD(0.5, clip_norm=CLIP), lambda p: torch.optim.SGD(p, lr=0.5), CLIP),
    "momentum_clip": (
        optim.SGD(0.3, momentum=0.9, nesterov=True, clip_norm=CLIP),
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True),
        CLIP,
    ),
    # Adam's first steps are close to sign descent: with eps = 1e-8, gradient entries near 1e-8
    # make the unrolled loss too rough for finite differences, so these use a larger eps.
    "adam": (optim.Adam(0.01, eps=1e-3), lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3), None),
    "adamw_clip": (
        optim.Adam(0.01, eps=1e-3, weight_decay=0.1, clip_norm=CLIP),
        lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-3, weight_decay=0.1),
        CLIP,
    ),
}
MODELS = {"transformer": tiny_lm, "user_module": user_lm}


class _Around(torch.nn.Module):
    """A user's module wrapping ``inner`` (a model or a rater), ``fn(self, ids)`` its forward:
    the one shape of the wrappers these tests need."""

    def __init__(self, inner: torch.nn.Module, fn) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, ids):
        return self.fn(self, ids)


def flat_grad(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def seq_loss(logits, batch):
    """Written independently of the library: per-sequence mean next-token CE over the mask."""
    ids = batch["input_ids"]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    mask = batch.get("loss_mask", torch.ones_like(ids, dtype=logits.dtype))[:, 1:].to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1)


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def unrolled_outer_loss(rater, model, inner, outer, torch_opt, clip, tau) -> float:
    """The whole computation with a real torch.optim optimizer on a copy of the model."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_opt(params)
    for batch in inner:
        with torch.no_grad():
            w = torch.softmax(rater(batch["input_ids"]) / tau, 0)
        opt.zero_grad()
        (w * seq_loss(logits_of(model(batch["input_ids"])), batch)).sum().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    with torch.no_grad():
        return float(seq_loss(logits_of(model(outer["input_ids"])), outer).mean())


def directional_fd(rater, fn, direction, eps=1e-6) -> float:
    """Central differences along ``direction`` with one Richardson step (error O(eps^4)).

    The step is small because the unrolled loss is sharply curved: Adam divides by |g| + eps,
    and gradient entries far below eps make its second derivative of order 1/eps^2.
    """
    return (
        4 * central_difference(rater, fn, direction, eps / 2)
        - central_difference(rater, fn, direction, eps)
    ) / 3


def central_difference(rater, fn, direction, eps) -> float:
    params = list(rater.parameters())

    def shift(scale):
        with torch.no_grad():
            for p, u in zip(params, direction):
                p.add_(scale * eps * u)

    shift(1)
    up = fn()
    shift(-2)
    down = fn()
    shift(1)
    return (up - down) / (2 * eps)


def run(mode, rater, model, state, inner, outer, opt, **kw):
    rater.zero_grad(set_to_none=True)
    res = dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode=mode, tau=TAU, **kw)
    return res, flat_grad(rater)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_mixed_equals_reverse_equals_finite_differences(model_name, opt_name, steps):
    opt, torch_opt, clip = OPTIMIZERS[opt_name]
    model, rater = MODELS[model_name](), tiny_rater()
    inner, outer = make_batches(steps, masked=True, seed=steps)
    state = dr.InnerState.init(model, opt)

    res_m, g_mixed = run("mixed", rater, model, state, inner, outer, opt)
    res_r, g_rev = run("reverse", rater, model, state, inner, outer, opt)
    assert rel(g_mixed, g_rev) < 1e-9
    assert res_m.outer_loss == pytest.approx(res_r.outer_loss, rel=1e-12)
    if clip is not None:
        assert min(res_m.inner_grad_norms) > clip, "clipping must be active in this test"

    def outer_loss():
        return unrolled_outer_loss(rater, model, inner, outer, torch_opt, clip, TAU)

    assert res_m.outer_loss == pytest.approx(outer_loss(), rel=1e-12)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in rater.parameters()]
        analytic = float(g_mixed @ torch.cat([u.flatten() for u in direction]))
        fd = directional_fd(rater, outer_loss, direction)
        assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("opt_name", ["momentum_clip", "adamw_clip"])
def test_mixed_equals_reverse_from_a_trained_state(opt_name):
    """Step counts and non-zero optimizer moments carried in from earlier steps."""
    opt = OPTIMIZERS[opt_name][0]
    model, rater = tiny_lm(), tiny_rater()
    state = dr.InnerState.init(model, opt)
    warm, _ = make_batches(3, seed=9)
    state = dr.meta_step(rater, model, state, warm, warm[0], optimizer=opt).state
    assert state.step == 3
    inner, outer = make_batches(3, seed=4)
    _, g_m = run("mixed", rater, model, state, inner, outer, opt)
    _, g_r = run("reverse", rater, model, state, inner, outer, opt)
    assert rel(g_m, g_r) < 1e-9


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("opt_name", ["momentum_clip", "adamw_clip"])
def test_both_modes_equal_pytorchs_own_reverse_over_reverse(model_name, opt_name):
    """The benchmarks' baseline (one tensor per parameter, autograd's own cross-entropy, every
    step in one graph) is an oracle that shares only the batch format and the optimizer's
    update formulas with meta_step; from a state with moments and a step count, with
    micro-batches in meta_step."""
    from datarater.meta.baseline import torch_reverse_over_reverse

    opt = OPTIMIZERS[opt_name][0]
    model, rater = MODELS[model_name](), tiny_rater()
    warm, _ = make_batches(2, seed=5)
    state = dr.meta_step(rater, model, dr.InnerState.init(model, opt), warm, warm[0],
                         optimizer=opt).state  # fmt: skip
    inner, outer = make_batches(3, masked=True, seed=6)
    meta, outer_loss = torch_reverse_over_reverse(
        rater, model, state, inner, outer, optimizer=opt, tau=TAU
    )
    expected = torch.cat([m.flatten() for m in meta])
    for mode in ("mixed", "reverse"):
        res, got = run(mode, rater, model, state, inner, outer, opt, micro_batch_size=3)
        assert rel(got, expected) < 1e-9, mode
        assert res.outer_loss == pytest.approx(outer_loss, rel=1e-12)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw_clip"])
def test_float32_mixed_is_close_to_reverse(opt_name):
    opt = OPTIMIZERS[opt_name][0]
    model, rater = tiny_lm(torch.float32), tiny_rater(torch.float32)
    inner, outer = make_batches(4, batch=8, masked=True)
    state = dr.InnerState.init(model, opt)
    _, g_m = run("mixed", rater, model, state, inner, outer, opt)
    _, g_r = run("reverse", rater, model, state, inner, outer, opt)
    assert g_m.dtype == torch.float32
    assert rel(g_m, g_r) < 1e-4


@pytest.mark.parametrize("mode", ["mixed", "reverse"])
def test_micro_batches_equal_the_whole_batch(mode):
    opt = OPTIMIZERS["adamw_clip"][0]
    model, rater = tiny_lm(), tiny_rater()
    inner, outer = make_batches(2, batch=7, masked=True)
    state = dr.InnerState.init(model, opt)
    res_full, g_full = run(mode, rater, model, state, inner, outer, opt)
    res_mb, g_mb = run(mode, rater, model, state, inner, outer, opt, micro_batch_size=3)
    assert rel(g_mb, g_full) < 1e-12
    assert res_mb.outer_loss == pytest.approx(res_full.outer_loss, rel=1e-12)
    for a, b in zip(res_mb.weights, res_full.weights):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    for k, v in res_full.state.params.items():
        torch.testing.assert_close(res_mb.state.params[k], v, rtol=1e-12, atol=1e-14)


def test_result_and_accumulation():
    opt = optim.Adam(1e-2)
    model, rater = tiny_lm(), tiny_rater()
    inner, outer = make_batches(2)
    state = dr.InnerState.init(model, opt)
    res, g1 = run("mixed", rater, model, state, inner, outer, opt)
    assert res.state.step == 2 and state.step == 0
    assert len(res.inner_losses) == 2 and all(isinstance(x, float) for x in res.inner_losses)
    assert isinstance(res.outer_loss, float) and not res.skipped
    for w in res.weights:
        assert w.shape == (5,) and float(w.sum()) == pytest.approx(1.0)
    assert all(not v.requires_grad for v in res.state.params.values())
    assert res.meta_grad_norm == pytest.approx(float(g1.norm()))
    # .grad accumulates like loss.backward()
    dr.meta_step(rater, model, state, inner, outer, optimizer=opt, tau=TAU)
    torch.testing.assert_close(flat_grad(rater), 2 * g1)
    # the returned state feeds the next call, and the model module itself is untouched
    before = [p.clone() for p in model.parameters()]
    dr.meta_step(rater, model, res.state, inner, outer, optimizer=opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_weights_follow_the_rater_scores():
    model, rater = tiny_lm(), tiny_rater()
    inner, outer = make_batches(1)
    state = dr.InnerState.init(model, optim.SGD(0.1))
    res = dr.meta_step(rater, model, state, inner, outer, optimizer=optim.SGD(0.1), tau=TAU)
    with torch.no_grad():
        expected = torch.softmax(rater(inner[0]["input_ids"]) / TAU, 0)
    torch.testing.assert_close(res.weights[0], expected)


# ------------------------------------------------------------------------------------------
# bad input


def _setup():
    model, rater = tiny_lm(), tiny_rater()
    opt = optim.SGD(0.1)
    return model, rater, opt, dr.InnerState.init(model, opt)


def test_empty_inner_batches():
    model, rater, opt, state = _setup()
    _, outer = make_batches(1)
    with pytest.raises(ValueError, match="inner_batches is empty"):
        dr.meta_step(rater, model, state, [], outer, optimizer=opt)


def test_rater_output_of_the_wrong_shape():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)

    bad = _Around(rater, lambda m, ids: m.inner(ids)[:, None])
    with pytest.raises(ValueError, match=r"scores of shape \[B\] = \[5\]"):
        dr.meta_step(bad, model, state, inner, outer, optimizer=opt)


def test_mixed_mode_refuses_dropout_in_training_mode():
    """Mixed mode recomputes forward passes: dropout would give it another network each time
    (a user's LM with dropout 0.5 had a meta-gradient 200 % off reverse mode's, silently)."""
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)

    class WithDropout(torch.nn.Module):
        def __init__(self, inner_module):
            super().__init__()
            self.inner_module = inner_module
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, ids):
            out = self.inner_module(ids)
            return out if out.dim() == 1 else self.drop(out)

    noisy = WithDropout(model)
    with pytest.raises(ValueError, match=r"dropout.*model\.drop \(p=0\.5\)"):
        dr.meta_step(rater, noisy, dr.InnerState.init(noisy, opt), inner, outer, optimizer=opt)
    noisy_rater = WithDropout(rater)
    noisy_rater.drop = torch.nn.Dropout1d(0.1)
    with pytest.raises(ValueError, match=r"rater\.drop \(p=0\.1\)"):
        dr.meta_step(noisy_rater, model, state, inner, outer, optimizer=opt)
    # in eval mode (or with p = 0) mixed mode runs and equals reverse mode; reverse mode runs
    # one forward pass per step, so it takes dropout as it is
    noisy.eval()
    noisy_state = dr.InnerState.init(noisy, opt)
    grads = {}
    for mode in ("mixed", "reverse"):
        rater.zero_grad()
        dr.meta_step(rater, noisy, noisy_state, inner, outer, optimizer=opt, mode=mode)
        grads[mode] = flat_grad(rater)
    assert rel(grads["mixed"], grads["reverse"]) < 1e-8
    noisy.train()
    dr.meta_step(rater, noisy, noisy_state, inner, outer, optimizer=opt, mode="reverse")


def test_a_state_of_another_model_or_optimizer_is_named():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    adam = optim.Adam(0.01)
    with pytest.raises(ValueError, match=r"\['exp_avg', 'exp_avg_sq'\].*another optimizer"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=adam)
    other = user_lm()
    with pytest.raises(ValueError, match="does not have: the state is another model's"):
        dr.meta_step(rater, other, state, inner, outer, optimizer=opt)


def test_models_may_return_a_mapping_of_logits():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)

    wrapped = _Around(model, lambda m, ids: {"logits": m.inner(ids), "extra": None})
    res = {}
    for name, m in (("dict", wrapped), ("tensor", model)):
        rater.zero_grad()
        out = dr.meta_step(rater, m, dr.InnerState.init(m, opt), inner, outer, optimizer=opt)
        res[name] = (out.outer_loss, flat_grad(rater))
    assert res["dict"][0] == res["tensor"][0]  # (the wrapper takes the generic pass)
    assert rel(res["dict"][1], res["tensor"][1]) < 1e-10

    bare = _Around(model, lambda m, ids: [m.inner(ids)])
    with pytest.raises(TypeError, match="a mapping with 'logits'.*returned list"):
        dr.meta_step(rater, bare, dr.InnerState.init(bare, opt), inner, outer, optimizer=opt)


def test_token_ids_out_of_the_model_vocabulary():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    inner[0]["input_ids"][0, 3] = VOCAB + 4
    with pytest.raises(ValueError, match=f"token id {VOCAB + 4} is out of range"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt)
    inner[0]["input_ids"][0, 3] = -2
    with pytest.raises(ValueError, match="negative token ids"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt)


def test_vocabulary_and_batch_size_mismatch_of_the_model():
    _, rater, opt, _ = _setup()
    small = tiny_lm(vocab=VOCAB - 5)
    inner, outer = make_batches(1)
    state = dr.InnerState.init(small, opt)
    with pytest.raises(ValueError, match="out of range for the model's vocabulary"):
        dr.meta_step(rater, small, state, inner, outer, optimizer=opt)

    m = _Around(tiny_lm(), lambda m, ids: m.inner(ids)[:-1])  # drops a row of logits
    with pytest.raises(ValueError, match=r"logits \[B, L, V\] = \[5, 9, V\]"):
        dr.meta_step(rater, m, dr.InnerState.init(m, opt), inner, outer, optimizer=opt)


def test_loss_mask_problems():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    inner[0]["loss_mask"] = torch.ones(5, 9)
    inner[0]["loss_mask"][2, 1:] = 0
    with pytest.raises(ValueError, match=r"masks every target of row\(s\) \[2\]"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt)
    inner[0]["loss_mask"] = torch.ones(5, 8)
    with pytest.raises(ValueError, match="loss_mask"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mode": "forward"}, "mode"),
        ({"tau": 0.0}, "tau"),
        ({"micro_batch_size": 0}, "micro_batch"),
        ({"micro_batch_size": True}, "micro_batch"),
        ({"tau": True}, "tau"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ],
)
def test_bad_options(kw, match):
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    with pytest.raises(ValueError, match=match):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, **kw)


def test_bad_batch_structure():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    with pytest.raises(TypeError, match="list of batches"):
        dr.meta_step(rater, model, state, inner[0], outer, optimizer=opt)
    with pytest.raises(ValueError, match="LongTensor"):
        dr.meta_step(
            rater,
            model,
            state,
            [{"input_ids": inner[0]["input_ids"].float()}],
            outer,
            optimizer=opt,
        )
    with pytest.raises(ValueError, match="at least 2 tokens"):
        dr.meta_step(
            rater, model, state, [{"input_ids": inner[0]["input_ids"][:, :1]}], outer, optimizer=opt
        )
    ids = inner[0]["input_ids"]
    hf_style = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(
        ValueError, match=r"key\(s\) \['attention_mask', 'labels'\].*Pad at the end"
    ):
        dr.meta_step(rater, model, state, [hf_style], outer, optimizer=opt)
    for mask in (torch.full(ids.shape, -1.0), torch.full(ids.shape, float("nan"))):
        with pytest.raises(ValueError, match=r"loss_mask'\] must be finite and >= 0"):
            dr.meta_step(rater, model, state, [{"input_ids": ids, "loss_mask": mask}], outer,
                         optimizer=opt)  # fmt: skip


@pytest.mark.parametrize("mode", ["mixed", "reverse"])
def test_non_finite_raises_or_skips(mode):
    model, rater, opt, state = _setup()
    inner, outer = make_batches(2)
    bad = state.clone()
    name = next(iter(bad.params))
    bad.params[name][0] = float("nan")
    with pytest.raises(dr.NonFiniteMetaGradient, match="the inner loss of step 0 is nan"):
        dr.meta_step(rater, model, bad, inner, outer, optimizer=opt, mode=mode)
    rater.zero_grad(set_to_none=True)
    res = dr.meta_step(
        rater, model, bad, inner, outer, optimizer=opt, mode=mode, on_nonfinite="skip"
    )
    assert res.skipped and "inner loss of step 0" in res.reason
    assert all(p.grad is None for p in rater.parameters())
    assert res.state is bad  # the non-finite update is not handed on


@pytest.mark.parametrize("mode", ["mixed", "reverse"])
def test_the_sweeps_read_no_scalar_back_per_inner_step(mode):
    """On a GPU every value read back (``float(t)``, ``bool(t)``) stalls the host until the
    device catches up. The batches' checks on entry read a few per batch; the sweeps
    themselves must read none per inner step, so the count grows with T by the checks only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    opt = OPTIMIZERS["adamw_clip"][0]
    model, rater = tiny_lm(), tiny_rater()
    state = dr.InnerState.init(model, opt)
    inner, outer = make_batches(4, masked=True, seed=2)
    counts = []
    for steps in (1, 4):
        Reads.n = 0
        with Reads():
            dr.meta_step(rater, model, state, inner[:steps], outer, optimizer=opt, mode=mode)
        counts.append(Reads.n)
    Reads.n = 0
    with Reads():
        dr.meta.SeqBatch.from_dict(inner[1], "a batch")
    assert Reads.n > 0
    assert counts[1] - counts[0] == 3 * Reads.n


def test_weighted_steps_equal_the_forward_sweep_of_meta_step():
    opt = optim.Adam(1e-2, clip_norm=1.0)
    model, rater = tiny_lm(), tiny_rater()
    inner, outer = make_batches(3, masked=True)
    state = dr.InnerState.init(model, opt)
    after_meta = dr.meta_step(rater, model, state, inner, outer, optimizer=opt, tau=TAU).state
    after_plain = dr.meta.weighted_steps(rater, model, state, inner, optimizer=opt, tau=TAU)
    assert after_plain.step == after_meta.step == 3
    for k, v in after_meta.params.items():
        torch.testing.assert_close(after_plain.params[k], v, rtol=1e-12, atol=1e-14)


class SdpaLM(torch.nn.Module):
    """A user's LM calling PyTorch's fused attention (as Hugging Face models do by default),
    or the same maths written out (``fused=False``)."""

    def __init__(self, fused: bool, vocab=VOCAB, d=12, heads=2, max_len=16) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fused, self.heads = fused, heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(max_len, d) * 0.3)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        b, n = ids.shape
        x = self.emb(ids) + self.pos[:n]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1) @ v
        return self.out(x + a.transpose(1, 2).reshape(b, n, -1))


def test_models_with_fused_attention_are_meta_differentiated(monkeypatch):
    """F.scaled_dot_product_attention's fused kernels have no forward-mode AD and no double
    backward; meta_step runs it on the math backend, so both modes work and equal the
    written-out attention."""
    opt = optim.Adam(0.01, eps=1e-3, clip_norm=CLIP)
    inner, outer = make_batches(2, masked=True)
    rater = tiny_rater()
    fused, plain = SdpaLM(True).double(), SdpaLM(False).double()
    grads = {}
    for name, model in (("fused", fused), ("plain", plain)):
        for mode in ("mixed", "reverse"):
            state = dr.InnerState.init(model, opt)
            grads[name, mode] = run(mode, rater, model, state, inner, outer, opt)[1]
    ref = grads["plain", "reverse"]
    for key, g in grads.items():
        assert rel(g, ref) < 1e-9, key

    # What users met before: PyTorch's own errors, now explained.
    monkeypatch.setattr(preflight_module, "attention_with_higher_derivatives", nullcontext)
    cases = (
        ("mixed", "func", "forward-mode AD"),
        ("mixed", "double", "a differentiable backward"),
        ("reverse", "auto", "a differentiable backward"),
    )
    for mode, hvp, need in cases:
        with pytest.raises(NotImplementedError, match=f"needs {need}.*attn_implementation='eager'"):
            run(mode, rater, fused, dr.InnerState.init(fused, opt), inner, outer, opt, hvp=hvp)


class _OldTanh(torch.autograd.Function):
    """tanh as an old-style custom Function (forward takes ctx), as many fused kernels are."""

    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OnceTanh(_OldTanh):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _OldTanh.backward(ctx, g)


class _OpaqueTanh(_OldTanh):
    @staticmethod
    def backward(ctx, g):
        return _OldTanh.backward(ctx, g).detach()  # as a kernel without derivatives would


def _after_lm(fn) -> _Around:
    """A user's LM whose logits go through a custom autograd Function under test."""
    return _Around(user_lm(), lambda m, ids: fn.apply(m.inner(ids).logits))


def test_an_op_without_the_needed_derivative_is_named():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.tanh(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * (1 - y * y)

    model, rater, opt = _after_lm(NoJvp), tiny_rater(), optim.SGD(0.1)
    inner, outer = make_batches(1)
    state = dr.InnerState.init(model, opt)
    with pytest.raises(
        NotImplementedError, match=r"needs forward-mode AD \(a jvp\).*mode='reverse'"
    ):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode="mixed", hvp="func")
    # the double-backward pass needs no jvp: both modes run and agree
    a = run("mixed", rater, model, state, inner, outer, opt)[1]
    b = run("reverse", rater, model, state, inner, outer, opt)[1]
    assert rel(a, b) < 1e-10


def test_half_precision_inner_parameters_are_refused():
    model, rater, opt, _ = _setup()
    half = copy.deepcopy(model).to(torch.bfloat16)
    inner, outer = make_batches(1)
    with pytest.raises(ValueError, match="inner parameters are torch.bfloat16"):
        dr.meta_step(rater, half, dr.InnerState.init(half, opt), inner, outer, optimizer=opt)


def test_mixed_mode_refuses_a_forward_pass_that_draws_random_numbers():
    model, rater, opt, _ = _setup()
    inner, outer = make_batches(1)
    # functional dropout in forward: no nn.Dropout layer to find by name
    noisy = _Around(model, lambda m, ids: F.dropout(m.inner(ids), 0.5, m.training))
    state = dr.InnerState.init(noisy, opt)
    with pytest.raises(ValueError, match="the model's forward pass draws random numbers"):
        dr.meta_step(rater, noisy, state, inner, outer, optimizer=opt)
    dr.meta_step(rater, noisy, state, inner, outer, optimizer=opt, mode="reverse")  # runs
    noisy.eval()  # no draws: the same as the plain model
    a = run("mixed", rater, noisy, state, inner, outer, opt)[1]
    b = run("mixed", rater, model, dr.InnerState.init(model, opt), inner, outer, opt)[1]
    assert rel(a, b) < 1e-12

    noisy_rater = _Around(
        rater, lambda m, ids: m.inner(ids) + 0.1 * torch.randn(ids.shape[0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="the rater's forward pass draws random numbers"):
        dr.meta_step(noisy_rater, model, dr.InnerState.init(model, opt), inner, outer,
                     optimizer=opt)  # fmt: skip

    # attention dropout (Hugging Face's attention_dropout) and a private generator are seen
    class AttentionDropout(SdpaLM):
        def forward(self, ids):
            b, n = ids.shape
            x = self.emb(ids) + self.pos[:n]
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3)
            gen = torch.Generator().manual_seed(0)
            noise = torch.rand(b, n, 1, generator=gen, dtype=x.dtype)
            return self.out(x + noise * a.transpose(1, 2).reshape(b, n, -1))

    drop = AttentionDropout(fused=True).double()
    with pytest.raises(
        ValueError, match=r"model's forward pass draws random numbers \(.*bernoulli"
    ):
        dr.meta_step(rater, drop, dr.InnerState.init(drop, opt), inner, outer, optimizer=opt)


def test_random_numbers_drawn_by_other_threads_are_not_the_models():
    import threading

    model, rater, opt, state = _setup()
    inner, outer = make_batches(2)
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            torch.randperm(1000)

    worker = threading.Thread(target=draw, daemon=True)
    worker.start()
    try:
        for _ in range(5):
            dr.meta_step(rater, model, state, inner, outer, optimizer=opt)
    finally:
        stop.set()
        worker.join()


def test_gradient_checkpointing_is_refused():
    model, rater, opt, state = _setup()
    inner, outer = make_batches(1)
    model.blocks[0].gradient_checkpointing = True  # Hugging Face's switch, on a submodule
    for mode in ("mixed", "reverse"):
        with pytest.raises(ValueError, match="gradient checkpointing on"):
            dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode=mode)
    with pytest.raises(ValueError, match="gradient checkpointing on"):
        dr.weighted_steps(rater, model, state, inner, optimizer=opt)


def test_a_once_differentiable_op_is_refused_in_both_modes():
    model, rater, opt = _after_lm(_OnceTanh), tiny_rater(), optim.SGD(0.1)
    inner, outer = make_batches(2)
    state = dr.InnerState.init(model, opt)
    with pytest.raises(NotImplementedError, match="once-differentiable"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode="reverse")
    with pytest.raises(NotImplementedError, match="once-differentiable"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode="mixed")
    with pytest.raises(NotImplementedError, match="needs forward-mode AD"):
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode="mixed", hvp="func")


def test_index_errors_name_the_limits_the_batches_exceed():
    class PosLM(torch.nn.Module):  # a position table, as GPT-2 has (n_positions)
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(vocab_size=VOCAB, n_positions=8)
            self.tok, self.pos = torch.nn.Embedding(VOCAB, 6), torch.nn.Embedding(8, 6)
            self.out = torch.nn.Linear(6, VOCAB)

        def forward(self, ids):
            return self.out(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    model, rater, opt, state = _setup()
    pos_lm = PosLM().double()
    long = [{"input_ids": torch.randint(0, VOCAB, (2, 12))}]
    with pytest.raises(
        ValueError, match="sequences of 12 tokens, beyond the model's n_positions of 8"
    ):
        dr.meta_step(rater, pos_lm, dr.InnerState.init(pos_lm, opt), long, long[0], optimizer=opt)
    small = tiny_rater(vocab=VOCAB - 5)
    ids = [{"input_ids": torch.full((2, 6), VOCAB - 1)}]
    with pytest.raises(ValueError, match=f"out of range for the rater's vocabulary of {VOCAB - 5}"):
        dr.meta_step(small, model, state, ids, ids[0], optimizer=opt)


def test_load_into_another_model_is_named():
    model, _, opt, state = _setup()
    with pytest.raises(ValueError, match="load_into: the state's .* another model"):
        state.load_into(user_lm())


def test_a_custom_function_whose_backward_has_no_graph_is_refused():
    """Old-style kernels (flash-attn's, many fused ones) compute their backward with kernels
    that have no derivatives: the second-order terms through them would vanish silently."""

    model, rater, opt = _after_lm(_OpaqueTanh), tiny_rater(), optim.SGD(0.1)
    inner, outer = make_batches(2)
    state = dr.InnerState.init(model, opt)
    for mode in ("reverse", "mixed"):
        with pytest.raises(NotImplementedError, match=r"Function\(s\) \['_OpaqueTanh'\] is not"):
            dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode=mode)


def test_checks_pass_what_is_deterministic_and_differentiable():
    """No false alarms: random-capable ops outside training or at probability 0, and a custom
    Function that returns a gradient for an input that needs none (an index)."""

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, idx):
            y = x.tanh()
            ctx.save_for_backward(y, idx)
            return y[..., idx]

        @staticmethod
        def backward(ctx, g):
            y, idx = ctx.saved_tensors
            gx = torch.zeros_like(y).index_add_(-1, idx, g) * (1 - y * y)
            return gx, torch.zeros_like(idx)  # (autograd drops it: idx needs no gradient)

    class Quiet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = user_lm()

        def forward(self, ids):
            logits = self.lm(ids).logits
            logits = torch.native_dropout(logits, 0.3, False)[0]
            logits = F.rrelu(logits, training=False) + F.dropout(logits, 0.0, True)
            idx = torch.arange(logits.shape[-1])
            return Gather.apply(logits, idx)

    model, rater, opt = Quiet(), tiny_rater(), optim.SGD(0.1)
    inner, outer = make_batches(2)
    state = dr.InnerState.init(model, opt)
    a = run("mixed", rater, model, state, inner, outer, opt)[1]
    b = run("reverse", rater, model, state, inner, outer, opt)[1]
    assert rel(a, b) < 1e-10


def test_the_callers_state_is_not_changed_by_buffer_updates():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = user_lm()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, ids):
            self.calls += 1  # as running statistics are updated in a forward pass
            return self.lm(ids).logits

    model, rater, opt = Counting(), tiny_rater(), optim.SGD(0.1)
    inner, outer = make_batches(2)
    state = dr.InnerState.init(model, opt)
    for mode in ("mixed", "reverse"):
        res = dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode=mode)
        assert float(state.buffers["calls"]) == 0 and float(res.state.buffers["calls"]) > 0
    after = dr.weighted_steps(rater, model, state, inner, optimizer=opt)
    assert float(state.buffers["calls"]) == 0 and float(after.buffers["calls"]) == 2


# ------------------------------------------------------------------------------------------
# optimizers and models that change what the library would otherwise assume


@dataclasses.dataclass(frozen=True)
class _CubicSGD(optim.SGD):
    """A subclass with its own step: not the update SGD's shortcuts assume."""

    def step(self, params, grads, state, step):
        return {k: p - self.lr * (grads[k] + 3 * grads[k] ** 3) for k, p in params.items()}, {}


@dataclasses.dataclass(frozen=True)
class _L2Adam(optim.Adam):
    """A subclass that changes the update itself (L2 added to the gradient before clipping)."""

    def update(self, params, grads, state, step):
        grads = {k: g + 0.5 * params[k] for k, g in grads.items()}
        return super().update(params, grads, state, step)


@dataclasses.dataclass(frozen=True)
class _DecayMatrices(optim.InnerOptimizer):
    """A per-tensor rule: weight decay on matrices only, read from each parameter's shape."""

    def init(self, params):
        return {}

    def step(self, params, grads, state, step):
        return {
            k: p - self.lr * (grads[k] + (0.5 * p if p.dim() >= 2 else 0.0))
            for k, p in params.items()
        }, {}


def _against_the_oracle(model, rater, opt, **kw):
    from datarater.meta.baseline import torch_reverse_over_reverse

    inner, outer = make_batches(3, masked=True, seed=21)
    state = dr.InnerState.init(model, opt)
    meta, _ = torch_reverse_over_reverse(rater, model, state, inner, outer, optimizer=opt, tau=TAU)
    want = torch.cat([m.flatten() for m in meta])
    for mode in ("mixed", "reverse"):
        _, got = run(mode, rater, model, state, inner, outer, opt, **kw)
        assert rel(got, want) < 1e-9, mode


@dataclasses.dataclass(frozen=True)
class _PerTensorNormalized(optim.InnerOptimizer):
    """State that is not shaped like the parameters: a step count per tensor (a scalar) and a
    running gradient norm kept for matrices only."""

    def init(self, params):
        return {
            "count": {k: torch.zeros((), dtype=p.dtype) for k, p in params.items()},
            "norm": {k: torch.zeros((), dtype=p.dtype) for k, p in params.items() if p.dim() > 1},
        }

    def step(self, params, grads, state, step):
        norm = {k: 0.5 * v + 0.5 * grads[k].norm() for k, v in state["norm"].items()}
        new = {k: p - self.lr * grads[k] / (1.0 + norm.get(k, 0.0)) for k, p in params.items()}
        return new, {"count": {k: c + 1 for k, c in state["count"].items()}, "norm": norm}


@pytest.mark.parametrize(
    "opt",
    [_CubicSGD(0.5), _L2Adam(0.01, eps=1e-3), _DecayMatrices(0.5), _PerTensorNormalized(0.5)],
    ids=["SGD subclass with its own step", "Adam subclass with its own update", "per-tensor",
         "per-tensor state of other shapes"],
)  # fmt: skip
def test_users_optimizers_get_per_parameter_tensors_and_their_own_update(opt):
    """Subclasses that change the update keep g_t (no rebuild from the moments), mixed mode
    runs their update (not clip + step), and every user optimizer sees the parameters by name
    and shape, as PyTorch's own reverse-over-reverse hands them."""
    _against_the_oracle(tiny_lm(), tiny_rater(), opt)


def _tied(lm):
    lm.lm_head.weight = lm.tok.weight
    return lm


def _hooked(lm):
    lm.register_forward_hook(lambda m, i, o: 0.5 * o)
    return lm


def _eps(lm):
    for b in lm.blocks:
        b.ln1.eps = 1e-2
    return lm


def _bidirectional(lm):
    for b in lm.blocks:
        b.attn.causal = False
    return lm


def _instance_forward(lm):
    block = lm.blocks[0]
    own = block.forward
    block.forward = lambda x, key_padding=None: 0.5 * own(x, key_padding)
    return lm


@pytest.mark.parametrize(
    "change", [_tied, _hooked, _eps, _bidirectional, _instance_forward], ids=lambda f: f.__name__
)
def test_a_changed_library_model_gets_a_pass_that_matches_it(change):
    """The hand-written pass runs only for the model it writes out (and a manual tie of the
    output projection to the embedding); a hook, a setting or a layer changed falls back."""
    from datarater.models.forward_over_reverse import computes_as_written

    lm = change(tiny_lm())
    assert computes_as_written(lm) == (change is _tied)
    _against_the_oracle(lm, tiny_rater(), optim.SGD(0.5))
    assert computes_as_written(tiny_lm())


def test_weighted_steps_under_no_grad_and_with_bad_arguments():
    model, rater, opt, state = _setup()
    inner, _ = make_batches(2)
    with torch.no_grad():
        after = dr.weighted_steps(rater, model, state, inner, optimizer=opt)
    want = dr.weighted_steps(rater, model, state, inner, optimizer=opt)
    for k in want.params:
        torch.testing.assert_close(after.params[k], want.params[k], rtol=0, atol=0)
    with torch.no_grad():  # mixed mode too
        dr.meta_step(rater, model, state, inner, inner[0], optimizer=opt)
    # any iterable of batches (a loader), and a numpy number for tau
    lazily = dr.weighted_steps(rater, model, state, iter(inner), optimizer=opt,
                               tau=np.float32(1.0))  # fmt: skip
    for k in want.params:
        torch.testing.assert_close(lazily.params[k], want.params[k], rtol=0, atol=0)
    with pytest.raises(TypeError, match="not one batch"):
        dr.weighted_steps(rater, model, state, inner[0], optimizer=opt)
    for kw, match in [
        (dict(tau=0.0), "tau"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(optimizer=optim.Adam(0.1)), "another optimizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            dr.weighted_steps(rater, model, state, inner, **{"optimizer": opt, **kw})
    too_big = [{"input_ids": torch.full((2, 5), VOCAB)}]
    with pytest.raises(ValueError, match="out of range"):
        dr.weighted_steps(rater, model, state, too_big, optimizer=opt)


def test_a_rater_with_batch_statistics_is_refused_where_batches_are_split_or_repeated():
    model, _, opt, state = _setup()
    rater = _Around(tiny_rater(), lambda m, ids: m.bn(m.inner(ids)[:, None])[:, 0])
    rater.bn = torch.nn.BatchNorm1d(1).double()
    inner, outer = make_batches(2)
    for kw in (dict(mode="mixed"), dict(mode="reverse", micro_batch_size=2)):
        with pytest.raises(ValueError, match="BatchNorm in training mode"):
            dr.meta_step(rater, model, state, inner, outer, optimizer=opt, **kw)
    dr.meta_step(rater, model, state, inner, outer, optimizer=opt, mode="reverse")  # exact
    dr.meta_step(rater.eval(), model, state, inner, outer, optimizer=opt)  # fixed statistics


def test_a_compiled_library_model_is_meta_differentiated():
    """torch.compile's wrapper names the parameters ``_orig_mod.*`` and hands attribute
    lookups to the model: the hand-written pass must not take names it does not know."""
    model, rater, opt, state = _setup()
    inner, outer = make_batches(2)
    _, want = run("reverse", rater, model, state, inner, outer, opt)
    compiled = torch.compile(model)
    state = dr.InnerState.init(compiled, opt)
    for mode in ("mixed", "reverse"):
        _, got = run(mode, rater, compiled, state, inner, outer, opt)
        assert rel(got, want) < 1e-9, mode
