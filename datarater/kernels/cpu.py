"""The C++ CPU backend (csrc/cpu/cross_entropy.cpp): vectorised, multithreaded, no N x V
temporaries. Inputs it cannot take raise a clear error; nothing is copied behind your back."""

from __future__ import annotations

import torch
from torch import Tensor

from ._ext import extension, load_error
from .primitives import Primitives

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class CpuPrimitives(Primitives):
    name = "cpu"

    def reason_unsupported(self, logits: Tensor) -> str | None:
        if extension() is None:
            return f"the C++ extension is not built ({load_error()})"
        if logits.device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {logits.device}"
        if logits.dtype not in _DTYPES:
            return f"the cpu backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
        if not logits.is_contiguous():
            return "the cpu backend needs contiguous logits (call .contiguous())"
        return None

    def forward(self, logits, targets, weights, ignore_index):
        loss, lse, nll = extension().ce_forward(
            logits, targets.contiguous(), _f32(weights), ignore_index
        )
        return loss, lse, nll

    def directional(
        self, logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out=None
    ):
        if direction is not None:
            direction = direction.to(logits.dtype).contiguous()
        dot, res = extension().ce_directional(
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


CPU = CpuPrimitives()
