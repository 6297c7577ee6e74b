"""The Triton attention as scoring runs it (no derivatives: one opaque operator, autotuned on
GPUs) against float64, and the rater and scoring paths that use it. Without a GPU the kernel
runs under the Triton interpreter (set by conftest.py) at small shapes; with one, the compiled
kernel runs at the rater's shapes. The training passes are tested in test_attention.py."""

from __future__ import annotations

import pytest
import torch

from datarater.kernels.attention import attention, attention_reference
from datarater.models import Rater, TransformerConfig, set_inference_attention

from .kernel_cases import interpreted, on_gpu, rel

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _qkv(b: int, h: int, n: int, d: int, dtype, seed: int, device="cpu"):
    """q, k, v as the rater makes them: strided views of one [B, L, 3, H, D] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device=device, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4)


def _keep(b: int, n: int, seed: int, device="cpu", empty_row: bool = False):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, n, generator=g) > 0.35
    keep[:, 0] = True
    if empty_row:
        keep[-1] = False  # a sequence with no key at all: zeros, as the reference gives
    return keep.to(device)


def _check(q, k, v, keep, causal, dtype):
    with torch.no_grad():
        out = attention(q, k, v, keep=keep, causal=causal, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), keep, causal)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.dtype == dtype
    assert rel(out, ref) <= TOL[dtype], rel(out, ref)


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 3, 37, 16), torch.float32), ((1, 2, 1, 32), torch.float32),
     ((2, 1, 70, 64), torch.float32), ((2, 3, 37, 16), torch.bfloat16),
     ((1, 2, 33, 32), torch.float16),
     ((2, 2, 32, 16), torch.float32), ((2, 2, 48, 32), torch.bfloat16)],  # whole blocks
    ids=str,
)  # fmt: skip
def test_triton_attention_matches_float64(shape, dtype, causal):
    b, h, n, d = shape
    q, k, v = _qkv(b, h, n, d, dtype, seed=n)
    _check(q, k, v, None, causal, dtype)
    _check(q, k, v, _keep(b, n, seed=n + 1, empty_row=b > 1), causal, dtype)


@interpreted
def test_triton_attention_takes_contiguous_inputs_too():
    q, k, v = (t.contiguous() for t in _qkv(2, 2, 19, 16, torch.float32, seed=3))
    _check(q, k, v, _keep(2, 19, seed=4), False, torch.float32)


def _rater(backend: str) -> Rater:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, max_seq_len=24, d_model=32, n_layers=2, n_heads=2)
    rater = Rater(cfg, pad_id=0).eval()
    return set_inference_attention(rater, backend)


@interpreted
def test_a_rater_scores_the_same_with_the_triton_attention():
    ids = torch.randint(1, 40, (5, 21))
    ids[1, 9:] = 0  # padding, masked
    ids[3, 2:] = 0
    with torch.inference_mode():
        want = _rater("sdpa")(ids)
        got = _rater("triton")(ids)
    assert rel(got, want) <= 1e-5


def test_scoring_refuses_the_triton_attention_off_the_gpu():
    from datarater.scoring.score import scoring_copy

    with pytest.raises(ValueError, match="needs a GPU and scoring runs on cpu"):
        scoring_copy(_rater("sdpa"), "cpu", 0, attention="triton")
    with pytest.raises(ValueError, match="attention must be one of"):
        scoring_copy(_rater("sdpa"), "cpu", 0, attention="flash")
    q, k, v = _qkv(65536, 1, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="batch x heads = 65536"):
        attention(q, k, v, backend="triton")  # more programs than the grid's second axis


@on_gpu
@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 5, 2048, 128), torch.bfloat16), ((2, 5, 2048, 128), torch.float32),
     ((3, 4, 333, 64), torch.bfloat16), ((1, 2, 1, 128), torch.float16),
     ((2, 3, 200, 32), torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_gpu_triton_attention_matches_float64(monkeypatch, shape, dtype):
    monkeypatch.setenv("DATARATER_ATTENTION_AUTOTUNE", "0")  # one block shape: fewer compiles
    b, h, n, d = shape
    q, k, v = _qkv(b, h, n, d, dtype, seed=n, device="cuda")
    for causal in (False, True):
        _check(q, k, v, None, causal, dtype)
        _check(q, k, v, _keep(b, n, seed=n + 1, device="cuda", empty_row=b > 1), causal, dtype)


@on_gpu
def test_gpu_scoring_with_the_triton_attention_matches_sdpa():
    from datarater.scoring.score import scoring_copy

    rater = _rater("sdpa").cuda()
    ids = torch.randint(1, 40, (16, 24), device="cuda")
    ids[3, 10:] = 0
    with torch.inference_mode():
        want = scoring_copy(rater, "cuda", 0)(ids)
        got = scoring_copy(rater, "cuda", 0, attention="triton")(ids)
    assert rel(got, want) <= 2e-2


@interpreted
def test_the_triton_attention_is_one_opaque_operator_to_torch_compile():
    """No graph break at the kernel call: compiled scoring keeps one graph per shape."""
    import torch._dynamo

    rater = _rater("triton")  # inference-only attention, as scoring copies are
    ids = torch.randint(1, 40, (3, 16))
    ids[1, 5:] = 0
    torch._dynamo.reset()
    with torch.inference_mode():
        report = torch._dynamo.explain(rater)(ids)
        want = rater(ids)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
    with torch.inference_mode():
        got = torch.compile(rater, dynamic=False)(ids)
    assert rel(got, want) <= 1e-5
