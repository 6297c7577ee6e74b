"""The opt-in scoring speed options on the CPU: FP8 linear layers and compiled, bucketed shapes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from datarater.cli import main
from datarater.models import fp8 as fp8_mod
from datarater.models.fp8 import (
    Float8Linear,
    check_fp8_device,
    float8_layers,
    float8_linear_reference,
    quantize_rows,
    to_float8,
)
from datarater.scoring.metrics import spearman
from datarater.scoring.score import (
    SCORE_COLUMN,
    _collect,
    _launch,
    _windows,
    bucket_width,
    score_texts,
    scoring_copy,
)
from datarater.training import save_rater

from .conftest import byte_rater, varied_texts
from .kernel_cases import rel

# ---------------------------------------------------------------- Float8Linear


@pytest.mark.parametrize(
    "k, n, lead",
    [(64, 96, (7,)), (32, 48, (3, 5)), (40, 50, (1, 9)), (17, 5, (13,)), (128, 16, (2, 1))],
    ids=str,
)
def test_float8_linear_matches_its_reference_and_float32(k, n, lead):
    gen = torch.Generator().manual_seed(k * 1000 + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    f8 = Float8Linear.from_linear(lin)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight_scale.dtype == torch.float32
    assert f8.weight.shape[0] % 16 == 0 and f8.weight.shape[1] % 16 == 0  # padded if needed
    for _ in range(2):  # fresh inputs each time, odd batch sizes
        x = torch.randn(*lead, k, generator=gen)
        got = f8(x)
        assert got.shape == (*lead, n) and got.dtype == x.dtype
        ref = float8_linear_reference(x, f8.weight, f8.weight_scale, f8.bias, n)
        assert rel(got, ref) <= 1e-6
        assert rel(got, lin(x).detach()) <= 6e-2
        assert rel(got, lin(x).detach()) > 0  # it did quantise


def test_the_fallback_without_a_cpu_kernel_is_the_reference(monkeypatch):
    torch.manual_seed(3)
    lin = nn.Linear(24, 40)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(11, 24)
    with_kernel = f8(x)
    monkeypatch.setattr(fp8_mod, "_cpu_scaled_mm_works", False)
    without = f8(x)
    assert rel(with_kernel, without) <= 1e-6
    torch.testing.assert_close(
        without, float8_linear_reference(x, f8.weight, f8.weight_scale, f8.bias, 40)
    )


def test_zero_rows_and_zero_features_stay_finite_and_exact():
    torch.manual_seed(4)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[3] = 0.0  # a dead output feature
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(5, 32)
    x[1] = 0.0  # a zero token (padding after a LayerNorm-free layer, say)
    out = f8(x)
    assert out.isfinite().all()
    torch.testing.assert_close(out[1], lin.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 3], lin.bias.detach()[3].expand(5), rtol=0, atol=0)
    q, s = quantize_rows(torch.zeros(2, 16))
    assert (q.float() == 0).all() and (s > 0).all()
    assert f8(torch.empty(0, 32)).shape == (0, 16)
    big = torch.full((1, 32), 1e30)  # huge values map into e4m3 by their scale, not to inf
    assert f8(big).isfinite().all()


def test_float8_linear_refuses_bad_inputs_and_old_gpus(monkeypatch):
    f8 = Float8Linear.from_linear(nn.Linear(16, 16))
    for bad in (torch.randn(16), torch.randn(2, 3, 4, 16)):
        with pytest.raises(ValueError, match="inputs, got shape"):
            f8(bad)
    with pytest.raises(ValueError, match="16 input features"):
        f8(torch.randn(3, 15))
    with pytest.raises(ValueError, match="floating-point"):
        f8(torch.ones(3, 16, dtype=torch.long))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Old GPU")
    with pytest.raises(ValueError, match=r"Old GPU.*capability 8\.0"):
        check_fp8_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    check_fp8_device("cuda:0")  # Ada and newer pass
    check_fp8_device("cpu")
    with pytest.raises(ValueError, match="model.blocks"):
        to_float8(nn.Sequential(nn.Linear(4, 4)))


def test_to_float8_converts_the_blocks_only_and_keeps_its_dtypes():
    rater = byte_rater()
    converted = to_float8(rater)
    names = float8_layers(converted)
    assert len(names) == 4 * rater.cfg.n_layers and all(n.startswith("blocks.") for n in names)
    assert isinstance(converted.head, nn.Linear) and not float8_layers(rater)  # copy
    assert isinstance(converted.tok, nn.Embedding)
    converted.to(torch.bfloat16)  # a model-wide cast must not undo the quantisation
    lin = converted.blocks[0].fc
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16 and converted.head.weight.dtype == torch.bfloat16
    assert "float8_e4m3fn" in repr(lin)
    same = to_float8(rater, inplace=True)
    assert same is rater and len(float8_layers(rater)) == len(names)


# ---------------------------------------------------------------- FP8 scoring


def test_fp8_scores_rank_like_float32_scores():
    rater = byte_rater(seed=5)
    texts = varied_texts(5)
    full = score_texts(rater, texts, aggregate="mean", batch_size=16)
    fp8 = score_texts(rater, texts, aggregate="mean", batch_size=16, precision="fp8")
    assert not float8_layers(rater)  # the caller's rater is left alone
    assert not torch.equal(full, fp8) and rel(fp8, full) < 0.1
    assert spearman(full, fp8) >= 0.98


def test_precision_options_are_checked_and_a_prepared_rater_is_reused():
    rater = byte_rater()
    with pytest.raises(ValueError, match="precision must be one of"):
        score_texts(rater, ["x"], precision="int8")
    with pytest.raises(TypeError, match="compile must be"):
        scoring_copy(rater, "cpu", 257, compile="yes")
    prepared = scoring_copy(rater, "cpu", 257, precision="fp8")
    assert float8_layers(prepared) and prepared.scoring_options == ("fp8", False, "sdpa")
    assert scoring_copy(prepared, "cpu", 257, precision="fp8") is prepared
    with pytest.raises(ValueError, match="already FP8"):
        scoring_copy(prepared, "cpu", 257, precision="fp32")
    bf16 = scoring_copy(rater, "cpu", 257, precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert scoring_copy(rater, "cpu", 257) is rater  # already as scoring runs it
    assert scoring_copy(rater.train(), "cpu", 257) is not rater  # train mode: copied


# ---------------------------------------------------------------- bucketed shapes


def test_bucket_widths_cover_every_width_with_few_shapes():
    for ctx in (32, 100, 2048):
        got = [bucket_width(w, ctx) for w in range(1, ctx + 1)]
        assert all(w <= b <= ctx for w, b in zip(range(1, ctx + 1), got))
        assert got == sorted(got) and got[-1] == ctx
    assert len(set(bucket_width(w, 2048) for w in range(1, 2049))) <= 10
    with pytest.raises(ValueError):
        bucket_width(0, 64)


def test_bucketing_leaves_scores_unchanged():
    rater = scoring_copy(byte_rater(seed=2), "cpu", 257)
    from datarater.data import get_tokenizer

    tok = get_tokenizer(None)
    # 23 windows of many lengths, some of a full context (a batch without padding), batches
    # of 4 (the last one partial)
    texts = varied_texts(2, n=20) + ["y" * 63, "z" * 63, "w" * 63]
    windows = _windows(texts, tok, rater.cfg.max_seq_len, "mean")
    shapes = []
    hook = rater.register_forward_pre_hook(
        lambda m, args, kw: shapes.append((tuple(args[0].shape), kw["padded"])), with_kwargs=True
    )
    plain = _collect(_launch(rater, windows, 4, 257))
    plain_shapes, shapes[:] = list(shapes), []
    fixed = _collect(_launch(rater, windows, 4, 257, fixed_shapes=True))
    hook.remove()
    torch.testing.assert_close(fixed, plain, rtol=1e-5, atol=1e-5)
    widths = {bucket_width(w, 64) for w in range(1, 65)}
    assert all(rows == 4 and width in widths for (rows, width), _ in shapes)
    assert any(rows < 4 for (rows, _), _ in plain_shapes)  # a partial batch was filled
    # the full-context batch still runs without a mask, its filler rows included
    assert any(not padded for _, padded in shapes)


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_a_scoring_copy_traces_into_one_graph(precision):
    """torch.compile of the copy scoring runs sees one graph, not one per attention layer."""
    import torch._dynamo

    # a copy, as every compiled or fp8 scoring rater is
    rater = scoring_copy(byte_rater(d=16, ctx=32).train(), "cpu", 257, precision)
    ids = torch.randint(0, 256, (3, 32))
    for padded in (False, True):
        with torch.inference_mode():
            report = torch._dynamo.explain(rater)(ids, padded=padded)
        assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons


@pytest.mark.slow
def test_compiled_scoring_equals_eager_on_the_cpu():
    rater = byte_rater(seed=6, d=16, layers=1, ctx=32)
    texts = varied_texts(6, n=24)
    eager = score_texts(rater, texts, aggregate="token_weighted", batch_size=8)
    prepared = scoring_copy(rater, "cpu", 257, compile=True)
    compiled = score_texts(prepared, texts, aggregate="token_weighted", batch_size=8, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert prepared._compiled_call_impl is not None
    assert scoring_copy(prepared, "cpu", 257, compile=True) is prepared


# ---------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_score_cli_precision_and_compile_flags(tmp_path, capsys):
    rater = byte_rater(seed=7, d=16, layers=1, ctx=32).train()
    folder = tmp_path / "rater"
    save_rater(rater, folder)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": t} for t in varied_texts(7, n=30)]
    (data / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = ["score", "--rater", str(folder), "--data", str(data), "--quiet"]

    def scores(name: str, *flags: str) -> torch.Tensor:
        assert main([*base, "--out", str(tmp_path / name), *flags]) == 0
        table = pq.read_table(tmp_path / name / "part-00000.parquet")
        return torch.tensor(table.column(SCORE_COLUMN).to_pylist())

    plain = scores("plain")
    fp8 = scores("fp8", "--precision", "fp8", "--compile")
    assert len(fp8) == 30 and fp8.isfinite().all()
    assert not torch.equal(fp8, plain) and spearman(plain, fp8) >= 0.98
    torch.testing.assert_close(scores("fp32", "--precision", "fp32"), plain)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "bad"), "--precision", "fp4"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
