"""The CUDA C++ backend (csrc/cuda/cross_entropy.cu), built when torch has CUDA and nvcc."""

from __future__ import annotations

import torch
from torch import Tensor

from ._ext import extension, load_error
from .primitives import Primitives

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class CudaPrimitives(Primitives):
    name = "cuda"

    def reason_unsupported(self, logits: Tensor) -> str | None:
        ext = extension()
        if ext is None:
            return f"the C++ extension is not built ({load_error()})"
        if not getattr(ext, "with_cuda", False):
            return "the extension was built without CUDA (torch without CUDA, or no nvcc)"
        if logits.device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {logits.device}"
        if logits.dtype not in _DTYPES:
            return f"the cuda backend takes float32, bfloat16 or float16, got {logits.dtype}"
        if not logits.is_contiguous():
            return "the cuda backend needs contiguous logits (call .contiguous())"
        return None

    def forward(self, logits, targets, weights, ignore_index):
        return tuple(
            extension().ce_forward_cuda(logits, targets.contiguous(), _f32(weights), ignore_index)
        )

    def directional(
        self, logits, targets, lse, direction, coef_h, coef_g, ignore_index, want_out, out=None
    ):
        if direction is not None:
            direction = direction.to(logits.dtype).contiguous()
        dot, res = extension().ce_directional_cuda(
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


CUDA = CudaPrimitives()
