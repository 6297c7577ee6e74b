"""InnerState: built from any module, usable with torch.func.functional_call."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import datarater as dr
from datarater import optim

from .conftest import make_batches, tiny_lm, user_lm


def test_init_copies_parameters_buffers_and_starts_the_optimizer():
    model = user_lm()
    state = dr.InnerState.init(model, optim.Adam(1e-3))
    assert set(state.params) == {k for k, _ in model.named_parameters()}
    assert set(state.buffers) == {"pos", "avg"}
    assert set(state.opt_state) == {"exp_avg", "exp_avg_sq"}
    assert all(float(v.abs().sum()) == 0 for v in state.opt_state["exp_avg"].values())
    assert state.step == 0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a copy, not an alias
    assert not torch.equal(next(iter(state.params.values())), next(model.parameters()))


def test_functional_call_and_call_agree_with_the_module():
    model = tiny_lm()
    state = dr.InnerState.init(model, optim.SGD(0.1))
    ids = make_batches(1)[1]["input_ids"]
    expected = model(ids)
    torch.testing.assert_close(
        functional_call(model, (state.params, state.buffers), (ids,)), expected
    )
    torch.testing.assert_close(state(model, ids), expected)


def test_load_into_round_trips_and_frozen_parameters_are_left_out():
    model = tiny_lm()
    model.pos.weight.requires_grad_(False)
    state = dr.InnerState.init(model, optim.SGD(0.1, momentum=0.9))
    assert "pos.weight" not in state.params
    assert set(state.opt_state["momentum_buffer"]) == set(state.params)
    moved = state.clone()
    for v in moved.params.values():
        v.add_(0.5)
    other = tiny_lm(seed=5)
    moved.load_into(other)
    for k, v in moved.params.items():
        assert torch.equal(dict(other.named_parameters())[k], v)
    assert state.num_bytes() == 2 * sum(v.numel() * 8 for v in state.params.values())


def test_a_model_without_trainable_parameters_is_refused():
    model = tiny_lm().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dr.InnerState.init(model, optim.SGD(0.1))
