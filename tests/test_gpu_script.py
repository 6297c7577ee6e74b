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
    "cut_cross_entropy/__init__.py": (
        "import torch.nn.functional as F\n"
        "def linear_cross_entropy(e, c, targets, reduction='mean', filter_eps='high'):\n"
        "    return F.cross_entropy((e @ c.T).float(), targets, reduction=reduction)\n"
    ),
}


def test_the_rival_rows_run_with_stand_ins_of_the_rival_libraries(tmp_path, monkeypatch):
    """The comparison code only meets Liger Kernel and Cut Cross-Entropy on a GPU machine;
    plain-torch stand-ins with their call signatures (and no package metadata) run every
    rival row here, so that it cannot rot between GPU slots."""
    for name, text in STAND_INS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench/gpu/bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.json"
    assert mod.main(["--smoke", "--only", "derivs,ce,linear", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rivals"] == {"liger-kernel": "unknown", "cut-cross-entropy": "unknown"}
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
    stand_ins = [r for (g, c), r in rows.items() if g == "derivatives" and "datarater" not in c
                 and "torch eager" not in c]  # fmt: skip
    assert len(stand_ins) == 6  # Liger twice and CCE once, in float32 and bf16
    assert all(r[m] == "yes" for r in stand_ins for m in mod.MODES)
