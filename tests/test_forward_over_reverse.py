"""The hand-written forward-over-reverse pass of CausalLM equals torch.func's, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jvp

import datarater as dr
from datarater.kernels import attention_blockwise
from datarater.meta.batch import SeqBatch, sequence_losses
from datarater.models import CausalLM, TransformerConfig
from datarater.models.forward_over_reverse import PassOptions

from .conftest import make_batches, tiny_rater


def _reference(model, params, tangents, batch: SeqBatch, w):
    def objective(p):
        l = sequence_losses(functional_call(model, p, (batch.input_ids,)), batch)
        return (w * l).sum(), l

    _, (hv, c) = jvp(grad(objective, has_aux=True), (params,), (tangents,))
    return hv, c


@pytest.mark.parametrize("remat", [False, True], ids=["", "remat"])
@pytest.mark.parametrize("attention", ["fused", "written"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shape", [(5, 11), (1, 2), (3, 16)])
def test_hvp_and_tangents_equal_torch_func(monkeypatch, tie, shape, attention, remat):
    # tiles of 4: the fused passes run blockwise (one tile would take the written-out formulas)
    monkeypatch.setattr(attention_blockwise, "BLOCK", 4)
    torch.manual_seed(sum(shape) + tie)
    cfg = TransformerConfig(
        vocab_size=37, max_seq_len=16, d_model=12, n_layers=2, n_heads=3, tie_embeddings=tie,
        attention=attention,
    )  # fmt: skip
    model = CausalLM(cfg).double()
    params = {k: v.detach() + 0.2 * torch.randn_like(v) for k, v in model.named_parameters()}
    params.pop("blocks.0.ln1.bias")  # a frozen parameter: the module's own tensor, no tangent
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    ids = torch.randint(0, 37, shape)
    mask = (torch.rand(shape) > 0.3).double()
    mask[:, 1] = 1.0
    batch = SeqBatch.from_dict({"input_ids": ids, "loss_mask": mask}, "b").to(torch.float64)
    w = torch.softmax(torch.randn(shape[0], dtype=torch.float64), 0)
    hv_ref, c_ref = _reference(model, params, tangents, batch, w)
    options = PassOptions(remat=remat)
    hv, c = model.hvp_and_tangents(
        params, tangents, ids, batch.targets, batch.token_weights, w, options
    )
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)
    assert set(hv) == set(params)
    for k in params:
        torch.testing.assert_close(hv[k], hv_ref[k], rtol=1e-9, atol=1e-11, msg=k)


def test_a_subclass_with_its_own_forward_falls_back():
    class Scaled(CausalLM):
        def forward(self, input_ids):
            return 2.0 * super().forward(input_ids)

    model = Scaled(TransformerConfig(vocab_size=29, max_seq_len=16, d_model=8, n_heads=2))
    assert model.hvp_and_tangents({}, {}, None, None, None, None) is None


@pytest.mark.parametrize("opt", [dr.optim.SGD(0.3, momentum=0.9), dr.optim.Adam(1e-2)])
def test_meta_step_is_the_same_with_either_pass(opt):
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=29, max_seq_len=16, d_model=16, n_heads=2))
    model = model.double()
    rater = tiny_rater()
    inner, outer = make_batches(3, masked=True)
    state = dr.InnerState.init(model, opt)
    grads = []
    for hvp in ("auto", "func"):
        rater.zero_grad(set_to_none=True)
        dr.meta_step(rater, model, state, inner, outer, optimizer=opt, hvp=hvp, micro_batch_size=2)
        grads.append(torch.cat([p.grad.flatten() for p in rater.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-10


def test_float32_pass_with_fused_kernels_matches_float64():
    torch.manual_seed(3)
    cfg = TransformerConfig(vocab_size=61, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    model = CausalLM(cfg)
    params = {k: v.detach() + 0.2 * torch.randn_like(v) for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    ids = torch.randint(0, 61, (4, 13))
    batch = SeqBatch.from_dict({"input_ids": ids}, "b")
    w = torch.softmax(torch.randn(4), 0)
    hv, c = model.hvp_and_tangents(
        params, tangents, ids, batch.targets, batch.token_weights.float(), w
    )
    model64 = CausalLM(cfg).double()
    p64 = {k: v.double() for k, v in params.items()}
    t64 = {k: v.double() for k, v in tangents.items()}
    hv_ref, c_ref = _reference(model64, p64, t64, batch.to(torch.float64), w.double())
    assert float((c.double() - c_ref).norm() / c_ref.norm()) < 1e-4
    for k in params:
        err = float((hv[k].double() - hv_ref[k]).norm() / hv_ref[k].norm().clamp_min(1e-12))
        assert err < 1e-4, (k, err)
