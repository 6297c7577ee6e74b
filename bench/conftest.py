"""Benchmark plumbing: every benchmark adds a row; the session prints them and saves JSON.

Run with ``pytest bench`` (add ``--benchmark-json=...`` for pytest-benchmark's own file). Rows
go to ``bench/results/<suite>-<machine>.json``; copy the figures you keep into RESULTS.md with
the machine's name.
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROWS: dict[str, list[dict]] = defaultdict(list)
SUMMARIES: dict[str, list[str]] = defaultdict(list)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{os.cpu_count()}cores-{platform.machine()}"


@pytest.fixture
def record():
    """record(suite, **row): keep one result row for the end-of-session table."""

    def add(suite: str, **row):
        ROWS[suite].append(row)

    return add


@pytest.fixture
def summarize():
    def add(suite: str, line: str):
        SUMMARIES[suite].append(line)

    return add


def pytest_terminal_summary(terminalreporter):
    out_dir = Path(__file__).parent / "results"
    for suite, rows in ROWS.items():
        out_dir.mkdir(exist_ok=True)
        path = out_dir / f"{suite}-{machine()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"machine": machine(), "torch": torch.__version__, "rows": rows}, indent=1)
        )
        tmp.replace(path)
        terminalreporter.write_sep("=", f"{suite} on {machine()} (saved to {path.name})")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        terminalreporter.write_line(" | ".join(keys))
        for r in rows:
            terminalreporter.write_line(" | ".join(_fmt(r.get(k, "")) for k in keys))
        for line in SUMMARIES.get(suite, []):
            terminalreporter.write_line(line)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
