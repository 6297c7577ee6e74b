"""The GPU benchmark script runs its code paths at tiny sizes on the CPU (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_script_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench/gpu/bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {r["group"] for r in rows} == {
        "weighted CE bf16 fwd+bwd",
        "linear+CE bf16 fwd+bwd",
        "meta_step",
        "scoring",
        "derivatives",
        "attention bf16",
        "meta_step scale",
    }
    assert all("error" not in r for r in rows)
    # every derivative mode of every loss function of ours matches float64 plain torch
    ours = [r for r in rows if r["group"] == "derivatives" and "datarater" in r["case"]]
    assert {r["case"] for r in ours} >= {
        f"{kind}, {dtype}: datarater cpu"
        for kind in ("weighted CE", "linear+CE")
        for dtype in ("float32", "bfloat16")
    }
    assert all(r[m] == "yes" for r in ours for m in mod.MODES)
    assert "| group | case |" in capsys.readouterr().out


STAND_INS = {
    "liger_kernel/__init__.py": "",
    "liger_kernel/transformers/__init__.py": "",
    "liger_kernel/transformers/functional.py": (
        "import torch.nn.functional as F\n"
        "def liger_cross_entropy(input, target, reduction='mean'):\n"
        "    return F.cross_entropy(input.float(), target, reduction=reduction)\n"
        "def liger_fused_linear_cross_entropy(input, weight, target, reduction='mean'):\n"
        "    return F.cross_entropy((input @ weight.T).float(), target, reduction=reduction)\n"
    ),
    "jvp_flash_attention/__init__.py": "",
    "jvp_flash_attention/jvp_attention.py": (
        "import torch\n"
        "def attention(q, k, v, causal=False, sm_scale=None):\n"
        "    s = (q @ k.transpose(-1, -2)).float() * sm_scale\n"
        "    n = q.shape[-2]\n"
        "    if causal:\n"
        "        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float('-inf'))\n"
        "    return (s.softmax(-1) @ v.float()).to(q.dtype)\n"
        "class JVPAttn:\n"
        "    fwd_dual = staticmethod(attention)\n"
    ),
    "cut_cross_entropy/__init__.py": (
        "import torch.nn.functional as F\n"
        "def linear_cross_entropy(e, c, targets, reduction='mean', filter_eps='high'):\n"
        "    return F.cross_entropy((e @ c.T).float(), targets, reduction=reduction)\n"
    ),
}


def test_the_rival_rows_run_with_stand_ins_of_the_rival_libraries(tmp_path, monkeypatch):
    """The comparison code only meets Liger Kernel, Cut Cross-Entropy and jvp-flash-attention
    on a GPU machine; plain-torch stand-ins with their call signatures (and no package
    metadata) run every rival row here, so that it cannot rot between GPU slots."""
    for name, text in STAND_INS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench/gpu/bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.json"
    assert mod.main(["--smoke", "--only", "derivs,ce,linear,attention", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rivals"] == {
        "liger-kernel": "unknown", "cut-cross-entropy": "unknown", "jvp-flash-attention": "unknown"
    }  # fmt: skip
    rows = {(r["group"], r["case"]): r for r in saved["rows"]}
    ce, linear, fast = "weighted CE bf16 fwd+bwd", "linear+CE bf16 fwd+bwd", "(its fast path)"
    for group, case in [
        (ce, "Liger, per-token loss x w"),
        (ce, f"Liger, summed loss without weights {fast}"),
        (linear, "Liger fused linear CE, per-token loss x w"),
        (linear, f"Liger fused linear CE, summed loss without weights {fast}"),
        (linear, "Cut Cross-Entropy, per-token loss x w (exact, filter off)"),
    ]:
        assert float(rows[group, case]["grad_rel_err"]) < 2e-2, case  # its own reference
    for what in ("forward", "backward", "forward + jvp"):
        assert "ms" in rows["attention bf16", f"jvp-flash-attention, {what}"], what
    stand_ins = [r for (g, c), r in rows.items() if g == "derivatives" and "datarater" not in c
                 and "torch eager" not in c]  # fmt: skip
    assert len(stand_ins) == 6  # Liger twice and CCE once, in float32 and bf16
    assert all(r[m] == "yes" for r in stand_ins for m in mod.MODES)


def _summary_module():
    spec = importlib.util.spec_from_file_location("summary", ROOT / "bench/gpu/summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_summary_table_judges_each_goal_from_the_saved_rows(tmp_path):
    """check.sh's last table: the best row per goal, memory net of the gradients, ratios taken
    in one run, error rows listed, a group cut off mid-write skipped, test tallies read."""
    ce = dict(group="weighted CE bf16 fwd+bwd", N=16384, V=131072)
    lin = dict(group="linear+CE bf16 fwd+bwd", N=8192, D=4096, V=131072)
    grads_mb = (8192 + 131072) * 4096 * 2 / 1e6
    meta = dict(group="meta_step", T=8)
    rows = [
        {**lin, "case": "a row without a peak", "ms": 1.0},
        {**ce, "case": "torch.compile", "ms": 5.0},
        {**ce, "case": "datarater cuda", "ms": 3.0},
        {**ce, "case": "datarater cuda fused sum, in place", "ms": 2.4},
        {**ce, "case": "Liger, per-token loss x w", "ms": 4.8},
        {**ce, "N": 16384, "V": 32768, "case": "datarater cuda", "ms": 0.5},  # another shape
        {**ce, "case": "datarater triton", "error": "RuntimeError: boom"},
        {**lin, "case": "datarater cuda, 32 MB chunks", "ms": 90.0, "peak_mb": grads_mb + 40},
        {**lin, "case": "datarater cuda, 1024 MB chunks", "ms": 36.0, "peak_mb": grads_mb + 900},
        dict(group="scoring", case="rater forward (inference)", tokens_per_s=3_000_000),
        dict(group="scoring", case="score pipeline (jsonl -> parquet)", tokens_per_s=2_600_000),
        {**meta, "case": "mixed", "ms": 50.0, "peak_mb": 100.0},
        {**meta, "case": "reverse", "ms": 90.0, "peak_mb": 500.0},
        {**meta, "case": "PyTorch reverse-over-reverse (baseline)", "ms": 100.0, "peak_mb": 400.0},
    ]
    (tmp_path / "gpu_ce.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    (tmp_path / "gpu_linear.json").write_text('{"device": "NVIDIA H200", "rows": [')  # cut off
    (tmp_path / "tests.log").write_text("....\n=== 3 failed, 87 passed in 21.00s ===\n")
    (tmp_path / "tests_registers.log").write_text("collecting ...\n")  # killed by its limit
    (tmp_path / "tests_none.log").write_text("=== no tests ran in 0.50s ===\n")
    text = _summary_module().summary(tmp_path)
    table = {
        line.split(" | ")[0].strip("| ").strip(): line.split(" | ")[1:]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    weighted = table["weighted CE, 16384 x 131072 bf16, fwd+bwd"]
    assert weighted == ["<= 2.5 ms", "2.40 ms", "datarater cuda fused sum, in place", "yes |"]
    liger = table["ours against Liger"]
    assert liger[1:] == ["0.50x its time", "Liger, per-token loss x w", "yes |"]
    lean = table["linear+CE, 8192 x 4096 x 131072 bf16"]
    assert lean == ["<= 37 ms in <= 64 MB", "90.0 ms, 40 MB", "datarater cuda, 32 MB chunks",
                    "no |"]  # fmt: skip
    assert table["fastest of ours, any memory"][1] == "36.0 ms, 900 MB"
    assert table["Cut Cross-Entropy"][-1] == "not measured |"
    assert table["rater forward, 70M, context 2048, bf16"][1:] == [
        "3.00M tokens/s", "rater forward (inference)", "no |"]  # fmt: skip
    assert table["score pipeline (read, tokenise, score, write)"][-1] == "yes |"
    mixed = table["meta_step T=8, mixed against PyTorch's reverse-over-reverse"]
    assert mixed[1:] == ["0.50x time, 0.25x memory", "mixed", "yes |"]
    assert table["meta_step T=8, reverse against PyTorch's reverse-over-reverse"][-1] == "no |"
    assert "NVIDIA H200, 14 rows" in text
    assert "rows with errors: 1" in text and "datarater triton: RuntimeError: boom" in text
    assert "tests: 3 failed, 87 passed" in text
    assert "tests_registers: no summary (cut short?)" in text
    assert "tests_none: no tests ran" in text


def test_the_summary_of_a_recorded_h200_run_matches_bench_results():
    """The third session's run 3 (bench/results), summarised: the figures RESULTS.md cites."""
    text = _summary_module().summary(ROOT / "bench/results/gpu-h200-2026-11-28-run3")
    assert "| rater forward, 70M, context 2048, bf16 | >= 4.0M tokens/s | 3.21M tokens/s |" in text
    assert "| 98.9 ms, 38 MB | datarater cuda, 32 MB chunks | no |" in text
    assert "tests: 90 passed" in text


def test_the_summary_judges_the_attention_goals(tmp_path):
    att = dict(group="attention bf16", B=8, H=16, L=2048, D=64)
    rows = [
        {**att, "case": "SDPA flash, forward", "ms": 1.0},
        {**att, "case": "SDPA flash, backward", "ms": 2.5},
        {**att, "case": "datarater triton, forward", "ms": 1.1},
        {**att, "case": "datarater triton, forward + jvp", "ms": 2.2},
        {**att, "case": "datarater triton, tangent of the backward", "ms": 7.0},
        {**att, "case": "jvp-flash-attention, forward + jvp", "ms": 2.0},
        {**att, "case": "datarater triton, backward after its forward (peak: both)", "L": 1024,
         "ms": 1.0, "peak_mb": 100.0},
        {**att, "case": "datarater triton, backward after its forward (peak: both)", "L": 4096,
         "ms": 9.0, "peak_mb": 420.0},
    ]  # fmt: skip
    (tmp_path / "gpu_attention.json").write_text(json.dumps({"device": "H100", "rows": rows}))
    table = {
        line.split(" | ")[0].strip("| ").strip(): line.split(" | ")[1:]
        for line in _summary_module().summary(tmp_path).splitlines()
        if line.startswith("| ")
    }
    assert table["attention D=64: forward against SDPA flash, forward"][1:] == [
        "1.10x", "datarater triton, forward", "yes |"
    ]  # fmt: skip
    assert table["attention D=64: forward + jvp against SDPA flash, forward"][-1] == "no |"
    assert table["attention D=64: tangent of the backward against SDPA flash, backward"][1] == (
        "2.80x"
    )
    assert table["against jvp-flash-attention's forward + jvp"][1:] == [
        "1.10x", "jvp-flash-attention, forward + jvp", "no |"
    ]  # fmt: skip
    assert table["attention peak memory, linear in L"][1] == "1.05x L's growth"


def test_the_summary_judges_the_meta_step_scale_goals(tmp_path):
    g = dict(group="meta_step scale")
    rows = [
        {**g, "case": "mixed", "model": "17m", "T": 8, "precision": "bf16", "ms": 70.0,
         "peak_mb": 500.0},
        {**g, "case": "PyTorch reverse-over-reverse (baseline)", "model": "17m", "T": 8,
         "precision": "bf16", "ms": 100.0, "peak_mb": 2000.0},
        {**g, "case": "plain training step", "model": "435m", "ms": 100.0, "peak_mb": 20000.0},
        {**g, "case": "mixed, block remat", "model": "435m", "ms": 900.0, "peak_mb": 30000.0,
         "mfu": 0.31},
        {**g, "case": "dry run's estimate", "model": "435m", "ratio": 1.1},
    ]  # fmt: skip
    (tmp_path / "gpu_scale.json").write_text(json.dumps({"device": "H100", "rows": rows}))
    table = {
        line.split(" | ")[0].strip("| ").strip(): line.split(" | ")[1:]
        for line in _summary_module().summary(tmp_path).splitlines()
        if line.startswith("| ")
    }
    t8 = table["17M, 16 x 256, T=8, bf16: mixed against PyTorch's reverse-over-reverse"]
    assert t8[1:] == ["0.70x time, 0.25x memory", "mixed", "yes |"]
    assert table["435m, T=2, bf16, block remat"][1:] == [
        "1.50x the plain step, MFU 31%", "mixed, block remat", "no |"
    ]  # fmt: skip
    assert table["125m, T=2, bf16, block remat"][-1] == "not measured |"
    assert table["435m: --dry-run's estimate"][-1] == "yes |"
