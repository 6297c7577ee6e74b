"""The ``attention`` group of bench_gpu.py: datarater's Triton attention, pass by pass, beside
PyTorch's flash attention (SDPA) and jvp-flash-attention 0.14 on the same inputs.

Causal, bf16, ``[B, H, L, D]`` inputs. Passes: the forward (the training one, which also
writes the log-sum-exp), the backward, the forward with its jvp, and the tangent of the
backward (forward-over-reverse, what meta_step's mixed mode runs; nobody else has it). Each
row carries its error against the same pass in float32 (the blockwise backend: exact maths, no
L x L tensor). Then forward + backward at growing L, whose peaks should grow linearly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datarater.kernels import attention_blockwise as blockwise
from datarater.kernels import triton_attention as T
from datarater.kernels.attention import Mask, attention

GROUP = "attention bf16"


def _inputs(device, b: int, h: int, n: int, d: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(n + d)
    return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(8)]


def _passes(x, m: Mask, mod):
    """The four passes of ``mod`` (triton_attention or attention_blockwise) on the inputs."""
    q, k, v, tq, tk, tv, go, tgo = x
    o, lse, to, tlse = mod.forward(q, k, v, m, tq, tk, tv)
    acc = torch.float32
    delta = (go.to(acc) * o.transpose(1, 2).to(acc)).sum(-1)
    tdelta = tgo.to(acc) * o.transpose(1, 2).to(acc) + go.to(acc) * to.transpose(1, 2).to(acc)
    tdelta = tdelta.sum(-1)
    return dict(
        forward=lambda: mod.forward(q, k, v, m),
        backward=lambda: mod.backward(q, k, v, lse, go, delta, m),
        jvp=lambda: mod.forward(q, k, v, m, tq, tk, tv),
        tangent=lambda: mod.backward_tangent(
            q, k, v, lse, go, delta, tq, tk, tv, tlse, tgo, tdelta, m
        ),  # fmt: skip
    )


def _err(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, want))
    den = sum(float(b.double().pow(2).sum()) for b in want)
    return round((num / max(den, 1e-300)) ** 0.5, 6)


def _ours(device, x, m, tags, case) -> None:
    ref = _passes([t.float() for t in x], m, blockwise)
    ours = _passes(x, m, T)
    keep = dict(forward=slice(0, 1), backward=slice(0, 3), jvp=slice(2, 3), tangent=slice(0, 3))
    names = dict(forward="forward", backward="backward", jvp="forward + jvp",
                 tangent="tangent of the backward")  # fmt: skip
    for key, fn in ours.items():

        def check(key=key, fn=fn):
            return dict(rel_err=_err(fn()[keep[key]], ref[key]()[keep[key]]))

        case(GROUP, f"datarater triton, {names[key]}", fn, device, check=check, **tags)


def _sdpa(device, x, m, tags, case) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, *_, go, _ = x

    def fwd():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=m.scale)

    def leaves():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ls = [t.detach().requires_grad_(True) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*ls, is_causal=True, scale=m.scale)

    case(GROUP, "SDPA flash, forward", fwd, device, **tags)
    case(GROUP, "SDPA flash, backward", lambda out: out.backward(go), device, setup=leaves,
         **tags)  # fmt: skip


def _jvp_flash(device, x, m, tags, case, rival) -> None:
    mod = rival("jvp_flash_attention.jvp_attention", GROUP, device)
    if mod is None:
        return
    q, k, v, tq, tk, tv, go, _ = x
    q, k, v, tq, tk, tv = (t.contiguous() for t in (q, k, v, tq, tk, tv))

    def fwd():
        return mod.attention(q, k, v, causal=True, sm_scale=m.scale)

    def leaves():
        ls = [t.detach().requires_grad_(True) for t in (q, k, v)]
        return mod.attention(*ls, causal=True, sm_scale=m.scale)

    def jvp():
        return torch.func.jvp(
            lambda a, b, c: mod.JVPAttn.fwd_dual(a, b, c, causal=True, sm_scale=m.scale),
            (q, k, v), (tq, tk, tv),
        )  # fmt: skip

    case(GROUP, "jvp-flash-attention, forward", fwd, device, **tags)
    case(GROUP, "jvp-flash-attention, backward", lambda out: out.backward(go), device,
         setup=leaves, **tags)  # fmt: skip
    case(GROUP, "jvp-flash-attention, forward + jvp", jvp, device, **tags)


def bench_attention(device, b: int, h: int, n: int, heads: tuple, lengths: tuple, case,
                    rival) -> None:  # fmt: skip
    """Every pass at ``b x h x n`` for each head size, then forward + backward at each of
    ``lengths`` (peak memory). ``case`` and ``rival`` are bench_gpu.py's."""
    for d in heads:
        x = _inputs(device, b, h, n, d)
        m = Mask(None, True, 1.0 / math.sqrt(d))
        tags = dict(B=b, H=h, L=n, D=d)
        _ours(device, x, m, tags, case)
        _sdpa(device, x, m, tags, case)
        _jvp_flash(device, x, m, tags, case, rival)
        del x
    d = heads[0]
    for length in lengths:
        q, k, v, *_, go, _ = _inputs(device, b, h, length, d)

        def leaves(q=q, k=k, v=v):
            ls = [t.detach().requires_grad_(True) for t in (q, k, v)]
            return attention(*ls, causal=True, backend="triton")

        case(GROUP, "datarater triton, backward after its forward (peak: both)",
             lambda out, go=go: out.backward(go.transpose(1, 2)), device, setup=leaves,
             **dict(B=b, H=h, L=length, D=d))  # fmt: skip
