"""The fused attention inside the models: the library's CausalLM and Rater, meta_step in both
modes and every hvp pass, weighted_steps, and Hugging Face models switched to it, each against
the written-out attention in float64; and memory that grows linearly in the length."""

from __future__ import annotations

import pytest
import torch

import datarater as dr
from datarater.kernels import attention_blockwise
from datarater.models import CausalLM, Rater, TransformerConfig
from datarater.profiling import measure, meta_step_workload

from .conftest import make_batches
from .kernel_cases import rel

VOCAB = 29


def _pair(kind_cls, seed: int, **cfg):
    """The same model twice, with fused and with written-out attention, in float64."""
    models = []
    for attention in ("fused", "written"):
        torch.manual_seed(seed)
        c = TransformerConfig(vocab_size=VOCAB, attention=attention, **cfg)
        models.append(kind_cls(c).double() if kind_cls is CausalLM else kind_cls(c, 0).double())
    return models


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(attention_blockwise, "BLOCK", 8)  # lengths below span several tiles


def test_the_models_compute_the_same_with_either_attention():
    lm_f, lm_w = _pair(CausalLM, 0, max_seq_len=32, d_model=16, n_heads=2)
    ids = torch.randint(1, VOCAB, (3, 27))
    out_f, out_w = lm_f(ids), lm_w(ids)
    assert rel(out_f, out_w) <= 1e-12
    (out_f**2).sum().backward()
    (out_w**2).sum().backward()
    for (name, p), q in zip(lm_f.named_parameters(), lm_w.parameters()):
        assert rel(p.grad, q.grad) <= 1e-10, name
    r_f, r_w = _pair(Rater, 1, max_seq_len=32, d_model=16, n_heads=2)
    ids[1, 10:] = 0  # padding, masked (pad_id 0)
    ids[2, 1:] = 0
    assert rel(r_f(ids), r_w(ids)) <= 1e-12


@pytest.mark.parametrize(
    "mode,hvp", [("mixed", "auto"), ("mixed", "func"), ("mixed", "double"), ("reverse", "auto")]
)
def test_meta_step_is_the_same_with_either_attention(mode, hvp):
    grads, states = [], []
    inner, outer = make_batches(2, batch=4, length=21, masked=True)
    for lm, rater in zip(
        _pair(CausalLM, 2, max_seq_len=32, d_model=16, n_heads=2),
        _pair(Rater, 3, max_seq_len=32, d_model=8, n_heads=2, n_layers=1),
    ):
        opt = dr.optim.Adam(1e-2, clip_norm=1.0)
        state = dr.InnerState.init(lm, opt)
        res = dr.meta_step(
            rater, lm, state, inner, outer, optimizer=opt, mode=mode, hvp=hvp,
            micro_batch_size=3,
        )  # fmt: skip
        grads.append(torch.cat([p.grad.flatten() for p in rater.parameters()]))
        states.append(torch.cat([p.flatten() for p in res.state.params.values()]))
    assert rel(grads[0], grads[1]) <= 1e-10
    assert rel(states[0], states[1]) <= 1e-12


def test_weighted_steps_are_the_same_with_either_attention():
    out = []
    batches, _ = make_batches(3, batch=4, length=19)
    for lm, rater in zip(
        _pair(CausalLM, 4, max_seq_len=32, d_model=16, n_heads=2),
        _pair(Rater, 5, max_seq_len=32, d_model=8, n_heads=2, n_layers=1),
    ):
        opt = dr.optim.SGD(0.3, momentum=0.9)
        state = dr.weighted_steps(rater, lm, dr.InnerState.init(lm, opt), batches, optimizer=opt)
        out.append(torch.cat([p.flatten() for p in state.params.values()]))
    assert rel(out[0], out[1]) <= 1e-12


def test_the_hand_written_pass_takes_the_attention_its_model_runs():
    """A block switched to the other attention than its config's sends the model to the
    generic pass (the hand-written one would compute another model)."""
    from datarater.models.forward_over_reverse import computes_as_written

    lm, _ = _pair(CausalLM, 6, max_seq_len=16, d_model=8, n_heads=2)
    assert computes_as_written(lm)
    lm.blocks[1].attn.kind = "written"
    assert not computes_as_written(lm)


def test_a_bad_attention_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerConfig(attention="flash")


def test_mixed_meta_step_memory_grows_linearly_in_the_length(monkeypatch):
    """Peak of a mixed meta-step at 2x the length: about 2x with the fused attention, more
    with the written-out one (its L x L scores grow 4x). Ratios within one run."""
    monkeypatch.setattr(attention_blockwise, "BLOCK", 32)
    kw = dict(batch=2, vocab=64, d_model=32, n_layers=1)

    def peak(n: int, attention: str) -> int:
        return measure(meta_step_workload, "mixed", 2, seq_len=n, attention=attention, **kw)

    fused = peak(512, "fused").peak_bytes / peak(256, "fused").peak_bytes
    written = peak(512, "written").peak_bytes / peak(256, "written").peak_bytes
    assert fused <= 2.2 < written, (fused, written)
