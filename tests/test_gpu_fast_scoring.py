"""GPU checks of the opt-in scoring options: FP8 linear layers and compiled, bucketed shapes.

Skipped on machines without CUDA; bench/gpu/check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datarater.models.fp8 import Float8Linear, check_fp8_device, float8_linear_reference
from datarater.scoring.metrics import spearman
from datarater.scoring.score import score_texts, scoring_copy

from .conftest import byte_rater, varied_texts
from .kernel_cases import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_GPU, reason="needs compute capability >= 8.9")


def test_the_fp8_capability_check_matches_the_device():
    if FP8_GPU:
        check_fp8_device("cuda")
    else:
        with pytest.raises(ValueError, match="capability"):
            check_fp8_device("cuda")


@needs_fp8
@pytest.mark.parametrize("k, n, m", [(640, 1920, 37), (128, 512, 1), (40, 50, 9)], ids=str)
def test_scaled_mm_path_matches_the_reference(k, n, m):
    torch.manual_seed(k + n)
    lin = nn.Linear(k, n).cuda().to(torch.bfloat16)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(m, 3, k, device="cuda", dtype=torch.bfloat16)
    got = f8(x)
    ref = float8_linear_reference(x, f8.weight, f8.weight_scale, f8.bias, n)
    assert got.shape == (m, 3, n) and got.dtype == torch.bfloat16
    assert rel(got, ref) <= 1e-2  # bf16 output rounding apart, the same fp8 products
    assert rel(got, lin(x)) <= 6e-2


@needs_fp8
def test_fp8_scores_rank_like_bf16_scores_on_the_gpu():
    rater, docs = byte_rater(1, d=128, ctx=128), varied_texts(1, soup=200, words=40)
    bf16 = score_texts(rater, docs, aggregate="mean", device="cuda", batch_size=16)
    fp8 = score_texts(rater, docs, aggregate="mean", device="cuda", batch_size=16, precision="fp8")
    assert fp8.isfinite().all() and not torch.equal(fp8, bf16)
    assert spearman(bf16, fp8) >= 0.98


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp8", marks=needs_fp8)])
def test_compiled_bucketed_scoring_equals_eager_on_the_gpu(precision):
    rater, docs = byte_rater(2, d=128, ctx=128), varied_texts(2, n=40, soup=200, words=40)
    eager = score_texts(rater, docs, device="cuda", batch_size=16, precision=precision)
    prepared = scoring_copy(rater, "cuda", 257, precision, compile=True)
    compiled = score_texts(
        prepared, docs, device="cuda", batch_size=16, precision=precision, compile=True
    )
    assert compiled.isfinite().all()
    assert rel(compiled, eager) <= 2e-2  # bf16 rounding: other kernels, other widths
    assert spearman(compiled, eager) >= 0.99
