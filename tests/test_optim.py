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
