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
