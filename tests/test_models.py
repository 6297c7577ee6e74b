"""The transformers: shapes, presets, forward-mode AD, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from datarater.models import CausalLM, Rater, TransformerConfig, preset


@pytest.mark.parametrize("name", ["toy", "tiny", "small"])
def test_parameter_count_formula_matches_the_module(name):
    cfg = preset(name)
    assert sum(p.numel() for p in CausalLM(cfg).parameters()) == cfg.num_parameters()


@pytest.mark.parametrize("name,millions", [("17m", 17), ("50m", 60), ("125m", 137), ("435m", 438)])
def test_presets_span_up_to_hundreds_of_millions(name, millions):
    assert preset(name).num_parameters() / 1e6 == pytest.approx(millions, rel=0.03)


def test_shapes_and_causality():
    torch.manual_seed(0)
    lm = CausalLM(preset("toy", vocab_size=50)).double()
    ids = torch.randint(0, 50, (3, 10))
    logits = lm(ids)
    assert logits.shape == (3, 10, 50)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    torch.testing.assert_close(lm(changed)[:, :7], logits[:, :7])  # the future is not seen
    rater = Rater(preset("toy", vocab_size=50), pad_id=0).double()
    assert rater(ids).shape == (3,)
    assert torch.isfinite(rater(torch.zeros(2, 5, dtype=torch.long))).all()  # all padding


@pytest.mark.parametrize("cls", [CausalLM, Rater])
def test_forward_mode_ad_matches_finite_differences(cls):
    torch.manual_seed(1)
    model = cls(TransformerConfig(vocab_size=31, max_seq_len=12, d_model=16, n_heads=2)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    ids = torch.randint(0, 31, (2, 9))

    def f(p):
        return torch.func.functional_call(model, p, (ids,))

    _, dout = jvp(f, (params,), (tangent,))
    eps = 1e-6
    up = f({k: v + eps * tangent[k] for k, v in params.items()})
    down = f({k: v - eps * tangent[k] for k, v in params.items()})
    torch.testing.assert_close(dout, (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    lm = CausalLM(preset("toy"))
    with pytest.raises(ValueError, match="max_seq_len"):
        lm(torch.zeros(1, 500, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        lm(torch.zeros(1, 5))
