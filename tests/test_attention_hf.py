"""Hugging Face models on datarater's attention (``attn_implementation="datarater"``): small
random Llama (grouped-query heads) and GPT-2 configs, meta_step in both modes against the same
models on PyTorch's math attention, in float64; padding; refusals by name."""

from __future__ import annotations

import pytest
import torch

import datarater as dr
from datarater.models import Rater, TransformerConfig

transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")
hf = pytest.importorskip("datarater.models.hf")

VOCAB = 37


def _llama(impl: str, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=impl, **kw,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _gpt2(impl: str, **kw):
    torch.manual_seed(0)
    settings = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                    eos_token_id=0) | kw  # fmt: skip
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        attn_implementation=impl, **settings,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of 8: these lengths run the blockwise passes (one tile would take the
    written-out formulas by default on the CPU)."""
    from datarater.kernels import attention_blockwise

    monkeypatch.setattr(attention_blockwise, "BLOCK", 8)


@pytest.fixture
def calls(monkeypatch):
    """How many times the kernel ran inside a Hugging Face model."""
    seen = []
    real = hf.attention

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "attention", spy)
    return seen


def _meta_grad(lm, mode: str, hvp: str = "auto") -> torch.Tensor:
    torch.manual_seed(5)
    rater = Rater(TransformerConfig(vocab_size=VOCAB, max_seq_len=64, d_model=8, n_layers=1,
                                    n_heads=2)).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inner = [{"input_ids": torch.randint(0, VOCAB, (3, 21), generator=g)} for _ in range(2)]
    outer = {"input_ids": torch.randint(0, VOCAB, (3, 21), generator=g)}
    opt = dr.optim.Adam(1e-2)
    state = dr.InnerState.init(lm, opt)
    dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode, hvp=hvp)
    return torch.cat([p.grad.flatten() for p in rater.parameters()])


@pytest.mark.parametrize(
    "make,mode,hvp",
    [(_llama, "mixed", "auto"), (_llama, "mixed", "func"), (_llama, "reverse", "auto"),
     (_gpt2, "mixed", "auto"), (_gpt2, "reverse", "auto")],
    ids=["llama-mixed", "llama-mixed-func", "llama-reverse", "gpt2-mixed", "gpt2-reverse"],
)  # fmt: skip
def test_meta_step_equals_the_math_attention(calls, make, mode, hvp):
    want = _meta_grad(make("sdpa"), mode, hvp)
    assert not calls
    got = _meta_grad(make("datarater"), mode, hvp)
    assert calls, "the model did not run datarater's attention"
    assert float((got - want).norm() / want.norm()) <= 1e-10


def test_a_padded_batch_and_a_switched_model(calls):
    ids = torch.randint(0, VOCAB, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    want = _llama("sdpa")(ids, attention_mask=mask).logits
    got = hf.use_datarater_attention(_llama("sdpa"))(ids, attention_mask=mask).logits
    assert calls
    valid = mask.bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-10)
    got_gpt2 = _gpt2("datarater")(ids, attention_mask=mask).logits
    want_gpt2 = _gpt2("sdpa")(ids, attention_mask=mask).logits
    assert torch.allclose(got_gpt2[valid], want_gpt2[valid], atol=1e-10)


def test_what_it_cannot_take_is_refused_by_name():
    lm = _gpt2("datarater", attn_pdrop=0.1).train()
    with pytest.raises(ValueError, match="no dropout"):
        lm(torch.randint(0, VOCAB, (2, 9)))
    sliding = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        attn_implementation="datarater",
    )  # fmt: skip
    with pytest.raises(ValueError, match="use attn_implementation='sdpa'"):
        transformers.MistralForCausalLM(sliding).eval()(torch.randint(0, VOCAB, (2, 9)))
