"""Backends compiled into ``datarater._C``: the C++ CPU kernels and the CUDA kernels.

Both take float32/bf16/fp16 contiguous logits on their device, float32 weights and
coefficients, and write no N x V temporaries. Inputs they cannot take raise a clear error when
the backend is forced; nothing is copied behind the caller's back.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._ext import extension, load_error
from .primitives import Primitives

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class NativePrimitives(Primitives):
    """The two primitives as functions of the extension, for one device type."""

    def __init__(self, name: str, device_type: str, suffix: str) -> None:
        self.name, self.device_type, self.suffix = name, device_type, suffix

    def _fn(self, what: str):
        return getattr(extension(), what + self.suffix)

    def reason_unsupported(self, logits: Tensor) -> str | None:
        ext = extension()
        if ext is None:
            return f"the C++ extension is not built ({load_error()})"
        if self.device_type == "cuda" and not getattr(ext, "with_cuda", False):
            return "the extension was built without CUDA (torch without CUDA, or no nvcc)"
        if logits.device.type != self.device_type:
            return f"the {self.name} backend needs {self.device_type} tensors, got {logits.device}"
        if logits.dtype not in _DTYPES:
            return (
                f"the {self.name} backend takes float32, bfloat16 or float16 logits, "
                f"got {logits.dtype}"
            )
        if not logits.is_contiguous():
            return f"the {self.name} backend needs contiguous logits (call .contiguous())"
        return None

    def forward(self, logits, targets, weights, ignore_index):
        loss, lse, nll = self._fn("ce_forward")(
            logits, targets.contiguous(), _f32(weights), ignore_index
        )
        return loss, lse, nll

    def directional(
        self, logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out=None
    ):
        if direction is not None:
            direction = direction.to(logits.dtype).contiguous()
        dot, res = self._fn("ce_directional")(
            logits,
            targets.contiguous(),
            _f32(lse),
            direction,
            _f32(coef_h),
            _f32(coef_g),
            ignore_index,
            want_out,
            out,
        )
        return dot, (res if want_out else None)

    def forward_grad(self, logits, targets, coef, ignore_index, out):
        fused = getattr(extension(), "ce_forward_grad" + self.suffix, None)
        if fused is not None and logits.shape[0] and logits.shape[1]:
            got = fused(
                logits, targets.contiguous(), _f32(coef), ignore_index, out, _part_bytes(), _slots()
            )
            if got:  # empty: this GPU or row length cannot take it; the two passes run
                loss, lse, nll, grad = got
                return loss, lse, nll, grad
        return super().forward_grad(logits, targets, coef, ignore_index, out)


def _part_bytes() -> int:
    """Shared memory per thread block of the fused CUDA kernel: a row of V logits is split
    over ceil(V * itemsize / this) blocks of one cluster (at most 8). Chosen by the sweep in
    bench/gpu/bench_gpu.py; ``DATARATER_CE_PART_BYTES`` overrides it."""
    raw = os.environ.get("DATARATER_CE_PART_BYTES", str(64 * 1024))
    if not raw.isdigit() or int(raw) < 1024:
        raise ValueError(f"DATARATER_CE_PART_BYTES must be a whole number >= 1024, got {raw!r}")
    return int(raw)


def fused_plan(logits: Tensor) -> tuple[str, int, int] | None:
    """Which fused CUDA kernel ``forward_grad`` runs on these logits (in place) with the current
    settings: ("registers" | "shared memory" | "two kernels", slots per thread, blocks per row).
    None without the CUDA extension. Benchmarks and tests report it: a fallback is silent."""
    plan = getattr(extension(), "ce_forward_grad_plan_cuda", None)
    if plan is None or not logits.is_cuda:
        return None
    kind, slots, blocks = plan(logits, logits, _part_bytes(), _slots())
    return kind, slots, blocks


def _slots() -> int:
    """Which fused CUDA kernel runs: 0 holds each row in shared memory (measured on an H200,
    the default), 16 or 32 hold it in registers, that many logits per thread, and evaluate one
    exponential per logit instead of two (written after the last GPU run: not yet measured).
    ``DATARATER_CE_FUSED_SLOTS`` chooses."""
    raw = os.environ.get("DATARATER_CE_FUSED_SLOTS", "0")
    if raw not in ("0", "16", "32"):
        raise ValueError(f"DATARATER_CE_FUSED_SLOTS must be 0, 16 or 32, got {raw!r}")
    return int(raw)


CPU = NativePrimitives("cpu", "cpu", "")
CUDA = NativePrimitives("cuda", "cuda", "_cuda")
