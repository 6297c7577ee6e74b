"""Every Triton kernel compiled for sm_90 (Hopper) on this machine, without a GPU.

The interpreter that runs them in the other tests does not compile them: errors that only
lowering finds (types, layouts, constexpr branches, shared memory beyond what a block may have,
no Hopper matrix instructions) would otherwise wait for a GPU slot. Like
tests/test_cuda_sources.py does for the CUDA files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is part of the test extras")
REPORT: list[str] = []


def test_every_triton_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_aot.py"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [
        line
        for line in out.stdout.splitlines()
        if line.startswith(("attention ", "cross-entropy ", "tangent ops"))
    ]
    # 4 inference attention cases, 3 training ones, 2 cross-entropy, 1 tangent line
    assert len(lines) == 10, out.stdout
    REPORT.extend(f"triton sm_90: {line}" for line in lines)
