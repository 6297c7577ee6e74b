"""GPU timings of the loss kernels and of meta_step, against torch eager and torch.compile.

Run by bench/gpu/check.sh on a GPU machine; ``--smoke`` runs the same code paths on the CPU at
tiny sizes (used by the test suite, so that the script cannot rot between GPU slots). Every
case is isolated: one that fails prints its error and the others go on. Prints a table last
and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import itertools
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import datarater as dr
from datarater.kernels import linear_weighted_cross_entropy, weighted_cross_entropy
from datarater.meta.baseline import torch_reverse_over_reverse
from datarater.models import Rater, preset, set_inference_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the groups kept in files beside it
from attention_group import bench_attention  # noqa: E402
from meta_scale_group import bench_scale, meta_setup  # noqa: E402

ROWS: list[dict] = []


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int = 5, warmup: int = 2, setup=None) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` (``fn(setup())`` when a setup makes each call's input,
    untimed) and the peak bytes above what was allocated before."""
    for _ in range(warmup):
        fn() if setup is None else fn(setup())
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        arg = None if setup is None else setup()
        sync(device)
        t0 = time.perf_counter()
        fn() if setup is None else fn(arg)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
        del arg
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return sorted(times)[len(times) // 2], peak


OUT: dict = {"path": None, "device": "", "rivals": {}}  # where add() keeps the JSON current


def add(row: dict) -> None:
    """Record a row: printed and saved at once, so a slot that runs out keeps it."""
    ROWS.append(row)
    print("row:", json.dumps(row), flush=True)
    _save(OUT["path"], OUT["device"])


def case(
    group: str,
    name: str,
    fn,
    device,
    setup=None,
    check=None,
    tokens_per_call: int | None = None,
    **extra,
) -> None:
    """Time ``fn`` into a row; ``check()`` (untimed, first) returns more fields for it (an
    error against float64, the kernel that ran); ``tokens_per_call`` adds a throughput. Any
    failure becomes an error row."""
    try:
        if check is not None:
            extra = {**extra, **check()}
        ms, peak = timed(fn, device, setup=setup)
        row = dict(group=group, case=name, ms=round(ms, 3), peak_mb=round(peak / 1e6, 1))
        if tokens_per_call is not None:
            row["tokens_per_s"] = round(tokens_per_call / ms * 1e3)
        add({**row, **extra})
    except Exception as e:  # noqa: BLE001 - report and go on
        add(dict(group=group, case=name, error=f"{type(e).__name__}: {e}"[:200]))
        traceback.print_exc()
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def env_var(key: str, value: str):
    """Sets an environment variable for the duration (the kernels read theirs per call)."""
    keep = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if keep is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = keep


@contextmanager
def matmul_tf32(on: bool):
    """TF32 tensor-core matmuls (and convolutions) for the duration, or strict float32."""
    keep = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = keep


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_err_all(got: list, want: list) -> float:
    """Relative error of a list of tensors taken as one vector."""
    num = sum(float((g - e).double().pow(2).sum()) for g, e in zip(got, want))
    den = sum(float(e.double().pow(2).sum()) for e in want)
    return (num / max(den, 1e-300)) ** 0.5


def bench_weighted_ce(device, n: int, v: int, backends: list[str]) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(n, v, generator=g).to(device=device, dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    w = torch.rand(n, generator=g).to(device)
    r = min(n, 1024)  # the float64 reference covers the first rows (memory)
    zz = z0[:r].double().requires_grad_(True)
    ref = F.cross_entropy(zz, t[:r], reduction="none") * w[:r].double()
    (ref_grad,) = torch.autograd.grad(ref.sum(), zz)
    del zz

    def run_with(loss_fn):
        leaf = z0.detach().requires_grad_(True)

        def run():
            return torch.autograd.grad(loss_fn(leaf), leaf)[0]

        return run

    def eager_upcast(z):
        return (F.cross_entropy(z.float(), t, reduction="none") * w).sum()

    def eager_native(z):
        return (F.cross_entropy(z, t, reduction="none") * w).sum()

    tag = dict(N=n, V=v)
    case(
        "weighted CE bf16 fwd+bwd",
        "torch eager (fp32 upcast)",
        run_with(eager_upcast),
        device,
        **tag,
    )
    case("weighted CE bf16 fwd+bwd", "torch eager native", run_with(eager_native), device, **tag)
    if torch.device(device).type == "cuda":
        compiled = torch.compile(eager_upcast)
        case("weighted CE bf16 fwd+bwd", "torch.compile", run_with(compiled), device, **tag)
    for b in backends:

        def ours(z, b=b):
            return weighted_cross_entropy(z, t, w, backend=b).sum()

        def check(ours=ours):
            return dict(grad_rel_err=f"{rel_err(run_with(ours)()[:r], ref_grad):.1e}")

        case("weighted CE bf16 fwd+bwd", f"datarater {b}", run_with(ours), device, check=check,
             **tag)  # fmt: skip
        bench_fused_ce(device, z0, t, w, ref_grad, b, tag)
    bench_liger_ce(device, z0, t, w, ref_grad, tag)
    if "cuda" in backends:  # the register-resident fused kernels (new: last, after the rest)
        for slots in ("16", "32"):
            with env_var("DATARATER_CE_FUSED_SLOTS", slots):
                name = f" (registers, {slots} per thread)"
                bench_fused_ce(device, z0, t, w, ref_grad, "cuda", {**tag, "slots": slots}, name)


def bench_fused_ce(device, z0, t, w, ref_grad, backend: str, tag: dict, name: str = "") -> None:
    """The training fast path: a summed loss whose gradient the forward writes over the logits
    (``inplace_backward=True``). Each call gets a fresh copy of the logits, made untimed, as a
    projection would write them; that copy is the only N x V buffer. ``ref_grad`` may cover
    the first rows only."""

    def fresh():
        return z0.detach().clone().requires_grad_(True)

    def run(z):
        loss = weighted_cross_entropy(z, t, w, reduction="sum", backend=backend,
                                      inplace_backward=True)  # fmt: skip
        return torch.autograd.grad(loss, z)[0]

    def check():
        z = fresh()
        extra = {}
        if backend == "cuda":  # which fused kernel really runs (a fallback is silent)
            from datarater.kernels.native import fused_plan

            extra["plan"] = str(fused_plan(z.detach()))
        extra["grad_rel_err"] = f"{rel_err(run(z)[: ref_grad.shape[0]], ref_grad):.1e}"
        return extra

    case(
        "weighted CE bf16 fwd+bwd",
        f"datarater {backend} fused sum, in place{name}",
        run,
        device,
        setup=fresh,
        check=check,
        **tag,
    )


RIVAL_HINT = (
    "pip install -e '.[rivals]'; with no network: bash bench/gpu/fetch_rivals.sh where there is "
    "one, then carry bench/gpu/wheels"
)


def rival(module: str, group: str, device):
    """A rival library (Liger Kernel, Cut Cross-Entropy) for the comparison rows, or None with a
    row saying how to get it. Their kernels are Triton only: on the CPU they run under
    ``TRITON_INTERPRET=1`` or not at all."""
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        add(dict(group=group, case=module, skipped=f"{e}; {RIVAL_HINT}"[:240]))
        return None
    dist = module.split(".")[0].replace("_", "-")
    try:  # saved beside the rows
        OUT["rivals"][dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # importable from a source tree
        OUT["rivals"][dist] = "unknown"
    return mod


def bench_liger_ce(device, z0, t, w, ref_grad, tag: dict) -> None:
    """Liger Kernel's cross-entropy on the same logits. It has no per-token weights, so the
    weighted loss is its per-token loss times w (its backward then multiplies an N x V
    gradient by w); its fastest path, a summed unweighted loss, is timed too, with its own
    reference. Like our in-place path it writes the gradient over the logits: each call gets
    a fresh copy, made untimed."""
    group = "weighted CE bf16 fwd+bwd"
    liger = rival("liger_kernel.transformers.functional", group, device)
    if liger is None:
        return
    r = ref_grad.shape[0]
    zz = z0[:r].double().requires_grad_(True)
    (unweighted_ref,) = torch.autograd.grad(F.cross_entropy(zz, t[:r], reduction="sum"), zz)

    def fresh():
        return z0.detach().clone().requires_grad_(True)

    def weighted(z):
        loss = (liger.liger_cross_entropy(z, t, reduction="none") * w).sum()
        return torch.autograd.grad(loss, z)[0]

    def summed(z):
        return torch.autograd.grad(liger.liger_cross_entropy(z, t, reduction="sum"), z)[0]

    for name, run, ref in (
        ("Liger, per-token loss x w", weighted, ref_grad),
        ("Liger, summed loss without weights (its fast path)", summed, unweighted_ref),
    ):

        def check(run=run, ref=ref):
            return dict(grad_rel_err=f"{rel_err(run(fresh())[:r], ref):.1e}")

        case(group, name, run, device, setup=fresh, check=check, **tag)


MODES = ("backward", "func_grad", "func_jvp", "hvp_jvp_of_grad", "double_backward")


def derivatives(f, xs: tuple, ts: tuple, r: tuple) -> dict:
    """The derivatives of a scalar loss ``f(*xs)`` in each mode a meta-gradient may use:
    autograd's backward, ``torch.func.grad``, ``torch.func.jvp`` (direction ``ts``), the
    Hessian-vector product as jvp of grad, and double backward (the gradient of
    <grad, r>). Each mode's value, or the exception it raised."""
    argnums = tuple(range(len(xs)))

    def backward():
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        return torch.autograd.grad(f(*leaves), leaves)

    def double_backward():
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        grads = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, r)), leaves)

    modes = {
        "backward": backward,
        "func_grad": lambda: torch.func.grad(f, argnums)(*xs),
        "func_jvp": lambda: torch.func.jvp(f, xs, ts)[1:],
        "hvp_jvp_of_grad": lambda: torch.func.jvp(torch.func.grad(f, argnums), xs, ts)[1],
        "double_backward": double_backward,
    }
    out = {}
    for mode, fn in modes.items():
        try:
            out[mode] = [y.detach().double() for y in fn()]
        except Exception as e:  # noqa: BLE001 - the answer is that it raised
            out[mode] = e
    return out


def bench_derivatives(device, backends: list[str]) -> None:
    """Which derivative modes each loss function gets right, ours and the rivals', on small
    float32 and bf16 inputs against the plain-torch loss in float64 on the same (rounded)
    inputs: "yes" (relative error < 1e-4 in float32, < 2e-2 in bf16: issue 3's bars), "wrong"
    with the error, or "no" with what it raised (Cut Cross-Entropy's backward takes bf16 or
    fp16 only: its float32 row says so). A meta-gradient needs the last three modes
    (design.md section 3.1)."""
    g = torch.Generator(device="cpu").manual_seed(2)
    n, d, v = 33, 16, 515

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    z, h, wt = rand(n, v), rand(n, d), rand(v, d) / d**0.5
    t = torch.randint(0, v, (n,), generator=g).to(device)
    w = torch.rand(n, generator=g).to(device)

    def ce_torch(z):
        return (F.cross_entropy(z, t, reduction="none") * w.to(z.dtype)).sum()

    def lin_torch(h, wt):
        return ce_torch(h @ wt.T)

    ce = {"torch eager": ce_torch}
    lin = {"torch eager": lin_torch}
    for b in backends:
        ce[f"datarater {b}"] = lambda z, b=b: weighted_cross_entropy(z, t, w, backend=b).sum()
        lin[f"datarater {b}"] = lambda h, wt, b=b: linear_weighted_cross_entropy(
            h, wt, t, w, backend=b
        ).sum()
    group = "derivatives"
    liger = rival("liger_kernel.transformers.functional", group, device)
    if liger is not None:  # it writes the gradient over its input: give it a copy
        ce["Liger"] = lambda z: (
            liger.liger_cross_entropy(z.clone(), t, reduction="none") * w
        ).sum()
        lin["Liger"] = lambda h, wt: (
            liger.liger_fused_linear_cross_entropy(h, wt, t, reduction="none") * w
        ).sum()
    cce = rival("cut_cross_entropy", group, device)
    if cce is not None:
        lin["Cut Cross-Entropy"] = lambda h, wt: (
            cce.linear_cross_entropy(h, wt, t, reduction="none", filter_eps=None) * w
        ).sum()
    cases = (("weighted CE", ce, (z,)), ("linear+CE", lin, (h, wt)))
    for (kind, fns, inputs), (dtype, tol) in itertools.product(
        cases, ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))
    ):
        xs = tuple(x.to(dtype) for x in inputs)
        ts, r = (tuple(torch.randn_like(x) for x in xs) for _ in range(2))
        ref = derivatives(
            fns["torch eager"], *(tuple(y.double() for y in ys) for ys in (xs, ts, r))
        )
        for name, f in fns.items():
            got = derivatives(f, xs, ts, r)
            row = dict(group=group, case=f"{kind}, {str(dtype)[6:]}: {name}")
            for mode in MODES:
                if isinstance(got[mode], Exception):
                    row[mode] = f"no ({type(got[mode]).__name__})"
                    row.setdefault("first_error", f"{mode}: {got[mode]}"[:160])
                    continue
                err = max(rel_err(a, b) for a, b in zip(got[mode], ref[mode]))
                row[mode] = "yes" if err < tol else f"wrong ({err:.1e})"
            add(row)


def _sweep_inputs(device, n: int, v: int):
    """bf16 logits, targets, weights, and the float64 gradient of the first 256 rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(n, v, generator=g).to(device=device, dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    w = torch.rand(n, generator=g).to(device)
    zz = z0[:256].double().requires_grad_(True)
    loss = (F.cross_entropy(zz, t[:256], reduction="none") * w[:256].double()).sum()
    (ref,) = torch.autograd.grad(loss, zz)
    return z0, t, w, ref


def sweep_cuda_fused(device, n: int, v: int) -> None:
    """The fused CUDA kernels: shared memory per block of the one that holds the row in shared
    memory, and logits per thread of the one that holds it in registers."""
    z0, t, w, ref = _sweep_inputs(device, n, v)
    for kb in (32, 64, 96, 128):
        with env_var("DATARATER_CE_PART_BYTES", str(kb * 1024)):
            tag = dict(N=n, V=v, part_kb=kb)
            bench_fused_ce(device, z0, t, w, ref, "cuda", tag, name=" (sweep)")
    for slots in ("16", "32"):
        with env_var("DATARATER_CE_FUSED_SLOTS", slots):
            tag = dict(N=n, V=v, slots=slots)
            bench_fused_ce(device, z0, t, w, ref, "cuda", tag, name=" (sweep)")


def sweep_triton_fused(device, n: int, v: int) -> None:
    """Block size and warps of the fused Triton kernel, to choose its defaults."""
    from datarater.kernels import triton_ce

    z0, t, w, ref = _sweep_inputs(device, n, v)
    keep = triton_ce._block, triton_ce._warps
    try:
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16, 32):
                triton_ce._block = lambda _v, b=block: b
                triton_ce._warps = lambda _b, k=warps: k
                tag = dict(N=n, V=v, block=block, warps=warps)
                bench_fused_ce(device, z0, t, w, ref, "triton", tag, name=" (sweep)")
    finally:
        triton_ce._block, triton_ce._warps = keep


def bench_linear_ce(device, n: int, d: int, v: int, backends: list[str]) -> None:
    """Output projection + weighted CE, forward and backward, against eager, torch.compile
    and the rival libraries; every row's gradients are compared with a float32 eager run."""
    g = torch.Generator(device="cpu").manual_seed(1)
    h0 = torch.randn(n, d, generator=g).to(device=device, dtype=torch.bfloat16)
    w0 = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    sw = torch.rand(n, generator=g).to(device)
    h, wt = h0.requires_grad_(True), w0.requires_grad_(True)

    def loss_fn(h, wt):
        return (F.cross_entropy((h @ wt.T).float(), t, reduction="none") * sw).sum()

    hf, wf = h0.detach().float().requires_grad_(True), w0.detach().float().requires_grad_(True)
    with matmul_tf32(False):
        ref = torch.autograd.grad(loss_fn(hf, wf), (hf, wf))
    del hf, wf
    rows = [("torch eager", lambda: loss_fn(h, wt))]
    if torch.device(device).type == "cuda":
        compiled = torch.compile(loss_fn)
        rows.append(("torch.compile", lambda: compiled(h, wt)))
    for b in backends:
        # 32 MB: vocabulary tiles (four projections, ~chunk_bytes extra); 256 MB and 1 GB: row
        # chunks whose logits also give the gradients (three projections, more memory)
        for mb in (32, 256, 1024) if b == backends[0] else (32,):

            def ours(b=b, mb=mb):
                return linear_weighted_cross_entropy(h, wt, t, sw, backend=b,
                                                     chunk_bytes=mb << 20).sum()  # fmt: skip

            rows.append((f"datarater {b}, {mb} MB chunks", ours))
    group = "linear+CE bf16 fwd+bwd"
    unweighted_rows = set()  # compared with the unweighted loss's gradients
    liger = rival("liger_kernel.transformers.functional", group, device)
    if liger is not None:  # chunks of rows; no per-token weights: per-token loss times w

        def liger_loss():
            return (liger.liger_fused_linear_cross_entropy(h, wt, t, reduction="none") * sw).sum()

        def liger_sum():  # its fast path: gradients computed in the forward
            return liger.liger_fused_linear_cross_entropy(h, wt, t, reduction="sum")

        rows.append(("Liger fused linear CE, per-token loss x w", liger_loss))
        unweighted_rows.add("Liger fused linear CE, summed loss without weights (its fast path)")
        rows.append(("Liger fused linear CE, summed loss without weights (its fast path)",
                     liger_sum))  # fmt: skip
    cce = rival("cut_cross_entropy", group, device)
    if cce is not None:  # its default skips gradient blocks it deems negligible ("high")
        for name, eps in (("its default gradient filter", "high"), ("exact, filter off", None)):

            def cce_loss(eps=eps):
                loss = cce.linear_cross_entropy(h, wt, t, reduction="none", filter_eps=eps)
                return (loss * sw).sum()

            rows.append((f"Cut Cross-Entropy, per-token loss x w ({name})", cce_loss))
    unweighted = None  # the reference of an unweighted row, made when one is timed
    for name, loss in rows:

        def run(loss=loss):
            return torch.autograd.grad(loss(), (h, wt))

        def check(run=run, name=name):
            nonlocal unweighted
            want = ref
            if name in unweighted_rows:
                if unweighted is None:
                    hf, wf = (x.detach().float().requires_grad_(True) for x in (h0, w0))
                    with matmul_tf32(False):
                        plain = F.cross_entropy(hf @ wf.T, t, reduction="sum")
                        unweighted = torch.autograd.grad(plain, (hf, wf))
                want = unweighted
            err = max(rel_err(a, b) for a, b in zip(run(), want))
            return dict(grad_rel_err=f"{err:.1e}")

        case(group, name, run, device, check=check, N=n, D=d, V=v)
    if torch.device(device).type == "cuda":  # where the low-memory path's time goes
        tiles = dict(rows)[f"datarater {backends[0]}, 32 MB chunks"]

        def tiled():
            return torch.autograd.grad(tiles(), (h, wt))

        profile_kernels(f"linear CE {backends[0]}, 32 MB chunks", tiled, device)


def bench_meta_step(device, size: str, batch: int, length: int, steps: list[int]) -> None:
    lm, rater, opt, state, batch_of = meta_setup(device, size, batch, length)
    outer = batch_of()
    tag = dict(model=size, tokens=f"{batch}x{length}")

    def plain():
        lm.zero_grad(set_to_none=True)
        logits = lm(outer["input_ids"])
        F.cross_entropy(
            logits[:, :-1].flatten(0, 1), outer["input_ids"][:, 1:].flatten()
        ).backward()

    case("meta_step", "plain training step", plain, device, T=0, **tag)
    for t_steps in steps:
        inner = [batch_of() for _ in range(t_steps)]

        def meta_grad(mode: str, inner=inner) -> list[torch.Tensor]:
            rater.zero_grad(set_to_none=True)
            dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode)
            return [p.grad.detach().clone() for p in rater.parameters()]

        with matmul_tf32(False):
            exact = meta_grad("reverse")  # what the TF32 rows are compared with
        # (the torch.func pass was timed in 2026-11-28's runs: 1.79x mixed). The TF32 rows ask
        # whether mixed mode's fewer ops and bytes (0.79x, bench/meta_step_work.py) win once
        # matmuls stop dominating: float32 matmuls run on CUDA cores, TF32 on tensor cores.
        # "double": the per-step pass users' own models get (one step's reverse-over-reverse).
        # Every row carries its meta-gradient's error against strict float32 reverse mode, so
        # a kernel that no GPU has run yet (the Triton tangent ops) cannot time a wrong answer.
        variants = (
            ("reverse", "reverse", "auto", "1", False),
            ("mixed", "mixed", "auto", "1", False),
            ("mixed (plain-torch tangent ops)", "mixed", "auto", "0", False),
            ("mixed, double-backward pass", "mixed", "double", "1", False),
            ("reverse, TF32 matmuls", "reverse", "auto", "1", True),
            ("mixed, TF32 matmuls", "mixed", "auto", "1", True),
        )
        for name, mode, hvp, triton_tangent, tf32 in variants:

            def run(mode=mode, hvp=hvp, inner=inner):
                rater.zero_grad(set_to_none=True)
                dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode, hvp=hvp)

            def check(mode=mode, exact=exact):
                return {"rel_err_vs_fp32_reverse": f"{rel_err_all(meta_grad(mode), exact):.1e}"}

            with env_var("DATARATER_TANGENT_TRITON", triton_tangent), matmul_tf32(tf32):
                case("meta_step", name, run, device, check=check,
                     T=t_steps, **tag)  # fmt: skip

        def baseline(inner=inner):  # what the library must beat, in the same run
            return torch_reverse_over_reverse(rater, lm, state, inner, outer, optimizer=opt)[0]

        def agrees(baseline=baseline, exact=exact):  # the same meta-gradient as ours
            return {"rel_err_vs_fp32_reverse": f"{rel_err_all(baseline(), exact):.1e}"}

        with matmul_tf32(False):
            case("meta_step", "PyTorch reverse-over-reverse (baseline)", baseline, device,
                 check=agrees, T=t_steps, **tag)  # fmt: skip
    if torch.device(device).type == "cuda":  # where the time goes, for the next session
        inner = [batch_of()]
        for mode in ("reverse", "mixed"):

            def one(mode=mode, inner=inner):
                rater.zero_grad(set_to_none=True)
                dr.meta_step(rater, lm, state, inner, outer, optimizer=opt, mode=mode)

            profile_kernels(f"meta_step {mode} T=1 {tag['model']} {tag['tokens']}", one, device)


def profile_kernels(title: str, fn, device, top: int = 15) -> None:
    """Print (and save beside the rows) the kernels that take ``fn``'s GPU time, and how busy
    the GPU was: kernel time over wall time; a low share means the host is the bottleneck
    (launches, Python, synchronisations). A failure here costs nothing but this table."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()  # warm
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall_ms = (time.perf_counter() - t0) * 1e3
        events = prof.key_averages()
        # kernels only: a CPU op also carries the device time of the kernels it launched
        kernels = [e for e in events if e.device_type != DeviceType.CPU]
        gpu_us = sum(e.self_device_time_total for e in kernels)
        launches = sum(e.count for e in kernels)
        table = events.table(
            sort_by="self_device_time_total", row_limit=top, max_name_column_width=60
        )
        text = (
            f"== {title}: wall {wall_ms:.1f} ms (profiled), kernels {gpu_us / 1e3:.1f} ms "
            f"({gpu_us / 1e3 / wall_ms:.0%} busy), {launches} kernel launches\n{table}"
        )
        print(text, flush=True)
        if OUT["path"]:
            with open(Path(OUT["path"]).with_name("profiles.txt"), "a") as f:
                f.write(text + "\n")
        add(
            dict(
                group="profile",
                case=title,
                wall_ms=round(wall_ms, 1),
                kernels_ms=round(gpu_us / 1e3, 1),
            )
        )
    except Exception as e:  # noqa: BLE001
        add(dict(group="profile", case=title, error=f"{e!r}"[:200]))


def bench_scoring(device, cfg, batch: int, shards: int, docs_per_shard: int) -> None:
    """Rater forward throughput (inference, bf16 on GPUs) and the whole ``score`` pipeline
    (read jsonl, tokenise, score, write parquet) on synthetic documents of one context each,
    eager and with the opt-in options (FP8 linear layers, torch.compile on bucketed shapes,
    the Triton attention). FP8 and Triton rows carry ``score_rel_err`` and ``spearman``
    against the eager forward's scores."""
    import tempfile

    from datarater.models.fp8 import to_float8
    from datarater.scoring.metrics import spearman
    from datarater.scoring.score import score_files, scoring_copy

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rater = Rater(cfg, pad_id=cfg.vocab_size - 1).to(device=device, dtype=dtype).eval()
    set_inference_attention(rater)  # as scoring copies are: no graph break when compiled
    n_params = sum(p.numel() for p in rater.parameters())
    ids = torch.randint(0, cfg.vocab_size - 2, (batch, cfg.max_seq_len), device=device)

    def forward():  # full windows: no padding, no mask (what scoring runs for them)
        with torch.inference_mode():
            rater(ids, padded=False)

    def masked():
        with torch.inference_mode():
            rater(ids)

    tag = dict(params_m=round(n_params / 1e6, 1), tokens=f"{batch}x{cfg.max_seq_len}")
    variants = [("rater forward (inference)", forward), ("rater forward, padding mask", masked)]
    fp8_rater = None
    try:  # FP8 needs compute capability >= 8.9 on GPUs; on the CPU it is the reference path
        fp8_rater = to_float8(rater)
    except Exception as e:  # noqa: BLE001 - report and go on
        add(dict(group="scoring", case="rater forward, fp8", error=str(e)[:200]))

    def fp8_forward():
        with torch.inference_mode():
            return fp8_rater(ids, padded=False)

    if fp8_rater is not None:
        variants.append(("rater forward, fp8 linear layers", fp8_forward))
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                forward()

        compiled_rater = torch.compile(rater)

        def compiled():
            with torch.inference_mode():
                compiled_rater(ids, padded=False)

        variants.append(("rater forward, cuDNN attention", cudnn))
        variants.append(("rater forward, compiled", compiled))
        if fp8_rater is not None:
            compiled_fp8 = torch.compile(fp8_rater, dynamic=False)

            def fp8_compiled():
                with torch.inference_mode():
                    return compiled_fp8(ids, padded=False)

            variants.append(("rater forward, fp8 linear layers, compiled", fp8_compiled))
        # datarater's Triton attention instead of PyTorch's flash attention
        tri = set_inference_attention(copy.deepcopy(rater), "triton")

        def tri_eager():
            with torch.inference_mode():
                return tri(ids, padded=False)

        def tri_masked():
            with torch.inference_mode():
                return tri(ids)

        variants.append(("rater forward, triton attention", tri_eager))
        variants.append(("rater forward, triton attention, padding mask", tri_masked))
        if fp8_rater is not None:
            tri_fp8 = torch.compile(
                set_inference_attention(copy.deepcopy(fp8_rater), "triton"), dynamic=False
            )

            def tri_fp8_compiled():
                with torch.inference_mode():
                    return tri_fp8(ids, padded=False)

            variants.append(
                ("rater forward, fp8 linear layers + triton attention, compiled", tri_fp8_compiled)
            )
    with torch.inference_mode():
        ref_scores = rater(ids, padded=False).float()
    for name, fn in variants:

        def agreement(fn=fn):  # scores against the bf16 eager forward's
            got = fn().float()
            return dict(
                score_rel_err=f"{rel_err(got, ref_scores):.1e}",
                spearman=round(spearman(got.cpu(), ref_scores.cpu()), 4),
            )

        check = agreement if ("fp8" in name or "triton" in name) else None
        tokens = batch * cfg.max_seq_len
        case("scoring", name, fn, device, check=check, tokens_per_call=tokens, **tag)

    # the pipeline, with the byte tokenizer (the rater's vocabulary must match it)
    byte_cfg = replace(cfg, vocab_size=258)
    rater = Rater(byte_cfg, pad_id=257)
    words = "the of and data model rater score token corpus filter quality text".split()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        doc_bytes = cfg.max_seq_len - 1
        for i in range(shards):
            picks = torch.randint(0, len(words), (docs_per_shard, doc_bytes // 5), generator=gen)
            rows = (
                json.dumps({"text": " ".join(words[j] for j in r)[:doc_bytes], "id": k})
                for k, r in enumerate(picks.tolist())
            )
            (tmp / "in" / f"shard{i:03d}.jsonl").write_text("\n".join(rows) + "\n")
        files = sorted(str(p) for p in (tmp / "in").iterdir())
        pipelines = [  # (row name, precision, compile, attention)
            ("score pipeline (jsonl -> parquet)", "auto", False, "sdpa"),
            ("score pipeline, compiled (bucketed shapes)", "auto", True, "sdpa"),
        ]
        if device == "cuda":
            pipelines.append(
                ("score pipeline, fp8 + compiled + triton attention", "fp8", True, "triton")
            )
        for k, (name, precision, compiled, attn) in enumerate(pipelines):
            try:
                # prepared once (and compiled by the warm-up shard), as a long run would be
                ready = scoring_copy(rater, device, 257, precision, compiled, attn)
                opts = dict(batch_size=batch, device=device, progress=False,
                            precision=precision, compile=compiled, attention=attn)  # fmt: skip
                score_files(ready, files[:1], "text", tmp / f"warm{k}", **opts)
                t0 = time.perf_counter()
                rep = score_files(ready, files, "text", tmp / f"out{k}", **opts)
                seconds = time.perf_counter() - t0
                if rep["failed"] or rep["rows"] != shards * docs_per_shard:
                    raise RuntimeError(f"pipeline incomplete: {rep['rows']} rows, {rep['failed']}")
                add(
                    dict(
                        group="scoring",
                        case=name,
                        ms=round(1e3 * seconds, 1),
                        params_m=round(sum(p.numel() for p in rater.parameters()) / 1e6, 1),
                        docs=rep["rows"],
                        tokens_per_s=round(rep["tokens_per_s"]),
                    )
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                add(dict(group="scoring", case=name, error=str(e)[:200]))
                traceback.print_exc()
            finally:
                ready = None
                if device == "cuda":
                    torch.cuda.empty_cache()


GROUPS = (
    "ce", "linear", "meta", "scoring", "ce32k", "sweep", "tsweep", "derivs", "attention", "scale",
)  # fmt: skip


def _save(path: str | None, device_name: str) -> None:
    if path:
        record = {"device": device_name, "rivals": OUT["rivals"], "rows": ROWS}
        Path(path).write_text(json.dumps(record, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", default=None, help="JSON rows, rewritten per group")
    p.add_argument(
        "--only", default=",".join(GROUPS), help=f"groups to run, in this order, from {GROUPS}"
    )
    args = p.parse_args(argv)
    only = args.only.split(",")
    if set(only) - set(GROUPS):
        p.error(f"--only takes groups from {GROUPS}")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    name = device if args.smoke else torch.cuda.get_device_name()
    backends = dr.kernels.available_backends(device)
    backends = [b for b in backends if b != "torch"] or ["torch"]
    if args.smoke:
        plan = {
            "ce": lambda: bench_weighted_ce(device, 64, 515, backends),
            "ce32k": lambda: bench_weighted_ce(device, 32, 129, backends),
            "sweep": lambda: None,  # the CUDA kernel needs a GPU
            "tsweep": lambda: "triton" in backends and sweep_triton_fused(device, 8, 300),
            "linear": lambda: bench_linear_ce(device, 48, 32, 300, backends),
            "meta": lambda: bench_meta_step(device, "toy", 4, 32, [1, 2]),
            "scoring": lambda: bench_scoring(device, preset("toy", max_seq_len=64), 8, 2, 20),
            "derivs": lambda: bench_derivatives(device, backends),
            "attention": lambda: bench_attention(device, 1, 2, 40, (16,), (32, 64), case, rival),
            "scale": lambda: bench_scale(device, add, timed, smoke=True),
        }
    else:
        print(name, torch.__version__, flush=True)
        plan = {
            "ce": lambda: bench_weighted_ce(device, 16384, 131072, backends),
            "ce32k": lambda: bench_weighted_ce(device, 16384, 32768, backends),
            "sweep": lambda: "cuda" in backends and sweep_cuda_fused(device, 16384, 131072),
            "tsweep": lambda: "triton" in backends and sweep_triton_fused(device, 16384, 131072),
            "linear": lambda: bench_linear_ce(device, 8192, 4096, 131072, backends),
            "meta": lambda: bench_meta_step(device, "17m", 16, 256, [1, 8]),
            "scoring": lambda: bench_scoring(device, preset("rater-70m"), 64, 8, 2000),
            "derivs": lambda: bench_derivatives(device, backends),
            "attention": lambda: bench_attention(
                device, 8, 16, 2048, (64, 128), (1024, 2048, 4096), case, rival
            ),
            "scale": lambda: bench_scale(device, add, timed, smoke=False),
        }
    OUT.update(path=args.out, device=name)

    def stop(signum, frame):  # `timeout` sends SIGTERM first: print the table, then leave
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stop)
    try:
        for group in only:  # in the order asked: a short slot runs what matters first
            try:
                plan[group]()
            except Exception as e:  # noqa: BLE001 - one group's failure must not cost the others
                add(dict(group=group, case="(the whole group)", error=f"{e!r}"[:200]))
                traceback.print_exc()
    finally:
        keys = list(dict.fromkeys(k for r in ROWS for k in r))
        print("\n| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in ROWS:
            print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
        _save(args.out, name)
    return 1 if any("error" in r for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
