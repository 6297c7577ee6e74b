"""The functional inner optimizers equal torch.optim step for step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from datarater import optim

CASES = [
    (optim.SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (optim.SGD(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (
        optim.SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    ),
    (optim.Adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (
        optim.Adam(1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    ),
]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(7, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("ours,theirs", CASES, ids=lambda c: repr(c)[:40])
def test_steps_equal_torch_optim(ours, theirs, clip):
    ours = dataclasses.replace(ours, clip_norm=clip)
    params = _params()
    tparams = [torch.nn.Parameter(v.clone()) for v in params.values()]
    topt = theirs(tparams)
    state = ours.init(params)
    for step in range(1, 4):
        grads = {k: torch.randn_like(v) * 3 for k, v in params.items()}
        params, state = ours.update(params, grads, state, step)
        for p, g in zip(tparams, grads.values()):
            p.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tparams, clip)
        topt.step()
        for (k, v), p in zip(params.items(), tparams):
            torch.testing.assert_close(
                v, p.detach(), rtol=1e-12, atol=1e-14, msg=f"{k} step {step}"
            )


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(0.1, momentum=0.9, clip_norm=0.3),
        optim.Adam(1e-2, clip_norm=0.3),
        optim.Adam(1e-2, betas=(0.0, 0.9)),
    ],
)
def test_gradient_is_rebuilt_from_consecutive_states(opt):
    params = _params()
    state = opt.init(params)
    params, state = opt.update(
        params, {k: torch.randn_like(v) for k, v in params.items()}, state, 1
    )
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    clipped, f, _ = opt.clip(grads)
    _, new_state = opt.step(params, clipped, state, 2)
    assert opt.recovers_grads
    rebuilt = opt.grads_for_vjp(state, new_state, params, f)
    for k in grads:
        torch.testing.assert_close(rebuilt[k], grads[k], rtol=1e-10, atol=1e-12)


def test_safe_sqrt_has_zero_derivative_at_zero():
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(optim.safe_sqrt(x).sum(), x, create_graph=True)
    assert g.tolist() == [0.0, 0.25]
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg[0] == 0.0 and torch.isclose(gg[1], torch.tensor(-1 / 32, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(
        optim.safe_sqrt, (torch.rand(6, dtype=torch.float64).add(0.1).requires_grad_(),)
    )
    assert torch.autograd.gradcheck(
        optim.safe_sqrt, (torch.rand(6, dtype=torch.float64).add(0.1).requires_grad_(),)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.SGD(0.0),
        lambda: optim.SGD(0.1, momentum=1.0),
        lambda: optim.SGD(0.1, nesterov=True),
        lambda: optim.Adam(0.1, betas=(0.9, 1.0)),
        lambda: optim.Adam(0.1, eps=0.0),
        lambda: optim.Adam(0.1, clip_norm=-1.0),
        lambda: optim.Adam(0.1, weight_decay=-0.1),
    ],
)
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(0.1),
        optim.SGD(0.1, clip_norm=0.5),
        optim.SGD(0.1, momentum=0.9, weight_decay=0.01, clip_norm=0.5),
        optim.SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.01, clip_norm=0.5),
        optim.SGD(0.05, momentum=0.8, nesterov=True, clip_norm=100.0),  # not clipping
        optim.Adam(1e-2),
        optim.Adam(1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, clip_norm=0.5),
        optim.Adam(1e-2, eps=1e-3, clip_norm=100.0),
    ],
    ids=repr,
)
@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("chunk", [optim.CHUNK, 4])
def test_written_out_update_vjp_equals_autograd(opt, step, chunk, monkeypatch):
    """Each optimizer's own VJP of its update equals autograd's (the base class's) in
    float64, clipping on or off, with second moments that are exactly zero in places, whole
    or in pieces of a few elements."""
    monkeypatch.setattr(optim, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(step)

    def like(scale=1.0):
        return {
            k: torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale for k, p in params.items()
        }

    params = _params(step)
    grads = like(0.7)
    state = opt.init(params)
    if state:  # a state that has seen earlier steps
        state = {n: like() for n in state}
    if "exp_avg_sq" in state:
        state["exp_avg_sq"] = {k: v.abs() for k, v in state["exp_avg_sq"].items()}
        state["exp_avg_sq"]["a"][0] = 0.0  # an entry that never saw a gradient ...
        grads["a"][0] = 0.0  # ... and does not now
    a_params = like()
    a_state = {n: like() for n in state}
    ours = opt.update_vjp(params, grads, state, step, a_params, a_state)
    ref = optim.InnerOptimizer.update_vjp(opt, params, grads, state, step, a_params, a_state)
    flat = [
        lambda r: list(r[0].values()),
        lambda r: [t for d in r[1].values() for t in d.values()],
        lambda r: list(r[2].values()),
    ]
    for part, name in zip(flat, ("params", "state", "grads")):
        got, want = part(ours), part(ref)
        assert len(got) == len(want), name
        for x, y in zip(got, want):
            assert torch.isfinite(x).all(), name
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=name)


def test_a_subclass_that_changes_the_update_gets_autograds_vjp():
    @dataclasses.dataclass(frozen=True)
    class Tripled(optim.Adam):
        def step(self, params, grads, state, step):
            new, st = super().step(params, grads, state, step)
            return {k: 3 * v - 2 * params[k] for k, v in new.items()}, st

    opt = Tripled(1e-2, clip_norm=0.5)
    params = _params(2)
    gen = torch.Generator().manual_seed(4)
    like = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    state = {n: {k: v.abs() for k, v in like.items()} for n in opt.init(params)}
    args = (params, like, state, 3, like, state)
    ours = opt.update_vjp(*args)
    ref = optim.InnerOptimizer.update_vjp(opt, *args)
    for x, y in zip(ours[2].values(), ref[2].values()):  # the gradients' adjoints
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    plain = optim.Adam(1e-2, clip_norm=0.5).update_vjp(*args)
    assert not torch.allclose(plain[2]["a"], ours[2]["a"])  # the override matters here
