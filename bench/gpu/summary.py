"""The short table `check.sh` prints last: each open GPU goal of the issues against the best row
that bears on it, the rivals beside ours, failed rows and the GPU tests' tallies.

    python3 bench/gpu/summary.py OUT_DIR     (the folder of gpu_<group>.json and *.log files)

It only reads what the benchmark groups saved, so it also summarises a slot cut short.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CE = "weighted CE bf16 fwd+bwd"
LINEAR = "linear+CE bf16 fwd+bwd"


def load_rows(folder: Path) -> tuple[str, list[dict]]:
    """Every row saved in the folder's JSON files, and the device's name."""
    device, rows = "", []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a group killed mid-write: its rows are in its log only
        if isinstance(record, dict) and isinstance(record.get("rows"), list):
            device = device or record.get("device", "")
            rows += record["rows"]
    return device, rows


def _ok(rows: list[dict], group: str, **tags) -> list[dict]:
    return [
        r
        for r in rows
        if r.get("group") == group
        and "error" not in r
        and all(r.get(k) == v for k, v in tags.items())
    ]


def _best(rows: list[dict], key: str, largest: bool = False) -> dict | None:
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    if not rows:
        return None
    return max(rows, key=lambda r: r[key]) if largest else min(rows, key=lambda r: r[key])


def goal_lines(rows: list[dict]) -> list[list[str]]:
    """One line per goal: [goal, target, measured, best row, met]; met is "-" where a line
    only shows a rival's figure, "not measured" where no row bears on it."""
    out = []

    def line(goal: str, target: str, row: dict | None, shown: str, met: bool | None = None):
        verdict = "-" if met is None else "yes" if met else "no"
        if row is None:
            shown, verdict = "-", "not measured"
        out.append([goal, target, shown, row["case"] if row else "-", verdict])

    ce = _ok(rows, CE, N=16384, V=131072)
    ours = _best([r for r in ce if r["case"].startswith("datarater")], "ms")
    ms = ours["ms"] if ours else float("inf")
    line("weighted CE, 16384 x 131072 bf16, fwd+bwd", "<= 2.5 ms", ours, f"{ms:.2f} ms", ms <= 2.5)
    for rival in ("torch.compile", "Liger"):
        theirs = _best([r for r in ce if r["case"].startswith(rival)], "ms")
        shown = f"{ms / theirs['ms']:.2f}x its time" if theirs else ""
        line(f"  ours against {rival}", "< 1x", theirs if ours else None, shown,
             bool(theirs and ms < theirs["ms"]))  # fmt: skip

    lin = [r for r in _ok(rows, LINEAR, N=8192, D=4096, V=131072) if "peak_mb" in r]
    for r in lin:  # memory beyond the bf16 gradients of h and W, which any method writes
        r["extra_mb"] = round(r["peak_mb"] - (r["N"] + r["V"]) * r["D"] * 2 / 1e6, 1)

    def shown_lin(r: dict | None) -> str:
        return f"{r['ms']:.1f} ms, {r['extra_mb']:.0f} MB" if r else ""

    ours_lin = [r for r in lin if r["case"].startswith("datarater")]
    lean = _best([r for r in ours_lin if r["extra_mb"] <= 64], "ms")
    line("linear+CE, 8192 x 4096 x 131072 bf16", "<= 37 ms in <= 64 MB", lean, shown_lin(lean),
         bool(lean and lean["ms"] <= 37))  # fmt: skip
    fast = _best(ours_lin, "ms")
    line("  fastest of ours, any memory", "-", fast, shown_lin(fast))
    for rival in ("torch.compile", "Liger", "Cut Cross-Entropy"):
        theirs = _best([r for r in lin if r["case"].startswith(rival)], "ms")
        line(f"  {rival}", "-", theirs, shown_lin(theirs))

    score = _ok(rows, "scoring")
    for goal, prefix, floor in (
        ("rater forward, 70M, context 2048, bf16", "rater forward", 4e6),
        ("score pipeline (read, tokenise, score, write)", "score pipeline", 2.5e6),
    ):
        row = _best([r for r in score if r["case"].startswith(prefix)], "tokens_per_s", True)
        tps = row["tokens_per_s"] if row else 0
        line(goal, f">= {floor / 1e6:.1f}M tokens/s", row, f"{tps / 1e6:.2f}M tokens/s",
             tps >= floor)  # fmt: skip

    meta = _ok(rows, "meta_step", T=8)
    base = next((r for r in meta if r["case"].startswith("PyTorch reverse-over-reverse")), None)
    for mode in ("mixed", "reverse"):
        row = next((r for r in meta if r["case"] == mode), None) if base else None
        time, memory = (row["ms"] / base["ms"], row["peak_mb"] / base["peak_mb"]) if row else (1, 1)
        line(f"meta_step T=8, {mode} against PyTorch's reverse-over-reverse",
             "< 1x time and memory", row, f"{time:.2f}x time, {memory:.2f}x memory",
             time < 1 and memory < 1)  # fmt: skip
    _attention_goals(rows, line)
    _scale_goals(rows, line)
    return out


SCALE = "meta_step scale"


def _scale_goals(rows: list[dict], line) -> None:
    """The meta_step-at-scale issue's goals."""
    t8 = {r["case"]: r for r in _ok(rows, SCALE, model="17m", T=8, precision="bf16")}
    mixed, base = t8.get("mixed"), t8.get("PyTorch reverse-over-reverse (baseline)")
    if mixed and base:
        time, memory = mixed["ms"] / base["ms"], mixed["peak_mb"] / base["peak_mb"]
        line("17M, 16 x 256, T=8, bf16: mixed against PyTorch's reverse-over-reverse",
             "<= 0.75x time, <= 0.3x memory", mixed, f"{time:.2f}x time, {memory:.2f}x memory",
             time <= 0.75 and memory <= 0.3)  # fmt: skip
    else:
        line("17M, 16 x 256, T=8, bf16: mixed against PyTorch's", "-", None, "")
    for size, goal in (("125m", "peak <= 2x a plain step"), ("435m", "fits, MFU >= 35 %")):
        at = {r["case"]: r for r in _ok(rows, SCALE, model=size)}
        mixed, plain = at.get("mixed, block remat"), at.get("plain training step")
        shown, met = "", False
        if mixed and plain:
            ratio = mixed["peak_mb"] / plain["peak_mb"]
            shown = f"{ratio:.2f}x the plain step, MFU {mixed['mfu']:.0%}"
            met = ratio <= 2 if size == "125m" else mixed["mfu"] >= 0.35
        line(f"{size}, T=2, bf16, block remat", goal, mixed if plain else None, shown, met)
        guess = at.get("dry run's estimate")
        if guess and guess.get("ratio"):
            line(f"  {size}: --dry-run's estimate", "within 20 %", guess,
                 f"{guess['ratio']:.2f}x the measured peak",
                 abs(guess["ratio"] - 1) <= 0.2)  # fmt: skip


ATTENTION = "attention bf16"
ATTENTION_GOALS = (  # (our pass, the pass it is held against, at most this many times its time)
    ("forward", "SDPA flash, forward", 1.2),
    ("forward + jvp", "SDPA flash, forward", 2.0),
    ("tangent of the backward", "SDPA flash, backward", 3.0),
)


def _attention_goals(rows: list[dict], line) -> None:
    """The attention issue's goals at each head size: our passes against SDPA's flash ones and
    against jvp-flash-attention's where it has the pass; the peak's growth with L."""
    att = _ok(rows, ATTENTION, L=2048)
    for d in sorted({r["D"] for r in att if isinstance(r.get("D"), int)}):
        at = {r["case"]: r for r in att if r.get("D") == d}
        for ours, base, most in ATTENTION_GOALS:
            row, ref = at.get(f"datarater triton, {ours}"), at.get(base)
            ratio = row["ms"] / ref["ms"] if row and ref else float("inf")
            line(f"attention D={d}: {ours} against {base}", f"<= {most}x", row if ref else None,
                 f"{ratio:.2f}x", ratio <= most)  # fmt: skip
            rival = at.get(f"jvp-flash-attention, {ours}")
            if rival and row:
                line(f"  against jvp-flash-attention's {ours}", "< 1x", rival,
                     f"{row['ms'] / rival['ms']:.2f}x", row["ms"] < rival["ms"])  # fmt: skip
    grow = sorted((r["L"], r["peak_mb"]) for r in _ok(rows, ATTENTION)
                  if "peak: both" in r["case"] and r.get("peak_mb"))  # fmt: skip
    if len(grow) >= 2:
        (l0, p0), (l1, p1) = grow[0], grow[-1]
        factor = (p1 / p0) / (l1 / l0)
        line("attention peak memory, linear in L", "~1x per L", {"case": "backward after its "
             f"forward, L {l0} -> {l1}"}, f"{factor:.2f}x L's growth", factor <= 1.2)  # fmt: skip


def test_tallies(folder: Path) -> list[str]:
    """The last pytest summary line of each test log, e.g. 'tests: 90 passed'."""
    out = []
    for path in sorted(folder.glob("tests*.log")):
        text = path.read_text(errors="replace")
        tally = r"(?:\d+ (?:passed|failed|error|skipped|deselected)|no tests ran)"
        found = re.findall(rf"^=*\s*({tally}.*?) in [\d.]+s", text, re.MULTILINE)
        out.append(f"{path.stem}: {found[-1] if found else 'no summary (cut short?)'}")
    return out


def summary(folder: Path) -> str:
    device, rows = load_rows(folder)
    lines = [f"## Summary: {device or 'unknown device'}, {len(rows)} rows", ""]
    lines += ["| goal | target | measured | best row | met |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in goal_lines(rows)]
    failed = [r for r in rows if "error" in r]
    lines.append("")
    lines.append(f"rows with errors: {len(failed)}")
    lines += [f"  {r.get('group')}: {r.get('case')}: {r['error'][:100]}" for r in failed]
    lines += test_tallies(folder)
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: summary.py OUT_DIR (the folder check.sh wrote)")
    print(summary(Path(sys.argv[1])))
