"""FP8 inference for the rater's linear layers (scoring only: no gradients flow through here).

A :class:`Float8Linear` keeps its weight in ``float8_e4m3fn`` with one float32 scale per
output feature, quantises its input with one scale per token, and multiplies with
``torch._scaled_mm`` (row-wise scales), so that the matmuls, about two thirds of the rater's
FLOPs, run on FP8 tensor cores where there are some (compute capability >= 8.9).
:func:`float8_linear_reference` is the same computation in plain float32 torch: it dequantises
exactly the fp8 values the kernel multiplies, so the two agree to float32 rounding.

``_scaled_mm`` on CUDA wants the reduction dimension and the output features to be multiples
of 16. Layers whose shapes are not are padded with zeros once, when they are converted (the
input's padding columns are zeros too), so any ``nn.Linear`` converts; the rater presets need
no padding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row whose largest magnitude is below this is scaled as if it were this: an all-zero row
# (padding, a dead feature) must not divide by zero. It then quantises to zeros, exactly.
AMAX_FLOOR = 1e-12
_MULTIPLE = 16  # _scaled_mm on CUDA: K and N multiples of 16 (M is free)
_cpu_scaled_mm_works: bool | None = None  # probed once: some CPU builds lack the kernel


def check_fp8_device(device: torch.device | str) -> None:
    """Raise ValueError when ``device`` is a GPU without FP8 tensor cores (capability < 8.9):
    ``_scaled_mm`` would refuse it later with a less helpful message. CPUs are allowed (the
    slow reference path)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"FP8 scoring needs FP8 tensor cores (compute capability >= 8.9, e.g. L4, H100, "
            f"H200); {device} ({name}) has capability {cap[0]}.{cap[1]}: use bf16"
        )


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, 1] float32)`` with ``x ~= q * scale``:
    each row's largest magnitude maps to the top of the e4m3 range (448)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def _round_up(n: int) -> int:
    return -(-n // _MULTIPLE) * _MULTIPLE


def _check_input(x: Tensor, in_features: int) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(
            f"Float8Linear takes [tokens, features] or [batch, length, features] inputs, got "
            f"shape {tuple(x.shape)}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"expected {in_features} input features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"Float8Linear needs a floating-point input, got {x.dtype}")


def _quantized_input(x: Tensor, padded_in: int) -> tuple[Tensor, Tensor]:
    """The 2-D fp8 input and its per-token scales, zero-padded to the weight's K."""
    x2 = x.reshape(-1, x.shape[-1])
    if padded_in != x2.shape[1]:
        x2 = F.pad(x2, (0, padded_in - x2.shape[1]))  # zeros leave each row's amax alone
    return quantize_rows(x2)


def float8_linear_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_features: int
) -> Tensor:
    """What :class:`Float8Linear` computes, in plain torch: quantise ``x`` per token as the
    module does, dequantise both operands to float32 and multiply. ``weight [N', K']`` is the
    (possibly padded) fp8 weight, ``weight_scale [1, N']`` its float32 scales. Returns
    ``x.dtype``. The CPU fallback and the yardstick of the tests."""
    _check_input(x, x.shape[-1])
    if x.shape[-1] > weight.shape[1] or out_features > weight.shape[0]:
        raise ValueError(
            f"an input of {x.shape[-1]} features and {out_features} outputs do not fit a "
            f"weight of shape {tuple(weight.shape)}"
        )
    q, s = _quantized_input(x, weight.shape[1])
    w = weight.float() * weight_scale.float().reshape(-1, 1)
    out = (q.float() * s) @ w.T
    out = out[:, :out_features]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


class Float8Linear(nn.Module):
    """An inference-only ``nn.Linear`` with an fp8 weight (row-wise scales) and fp8 inputs
    (per-token scales). Build it with :meth:`from_linear`.

    The fp8 weight and its scales keep their dtypes through ``.to(dtype)`` / ``.half()``
    (only their device follows), so a converted model can be moved like any other; the bias
    follows the model's dtype."""

    weight: Tensor
    weight_scale: Tensor

    def __init__(
        self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, in_features: int,
        out_features: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """Quantise a trained ``nn.Linear`` (its weight padded to multiples of 16)."""
        check_fp8_device(linear.weight.device)
        _cpu_scaled_mm()  # probed here, eagerly: inside a compiled forward it would break the graph
        n, k = linear.weight.shape
        w = linear.weight.detach()
        w = F.pad(w, (0, _round_up(k) - k, 0, _round_up(n) - n))
        q, scale = quantize_rows(w)  # one scale per output feature
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.reshape(1, -1).contiguous(), bias, k, n)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=float8_e4m3fn {tuple(self.weight.shape)}"
        )

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every floating-point tensor, fp8 included: that would
        # silently turn this back into a (lossy) bf16 layer. Keep the stored dtypes; follow
        # only the device.
        kept = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features)
        if x.numel() == 0:  # no tokens: nothing to scale (and _scaled_mm rejects the strides)
            return x.new_empty(*x.shape[:-1], self.out_features)
        if x.device.type != "cuda" and not _cpu_scaled_mm():
            return float8_linear_reference(
                x, self.weight, self.weight_scale, self.bias, self.out_features
            )
        q, s = _quantized_input(x, self.weight.shape[1])
        n = self.out_features
        if x.device.type == "cuda":
            # row-wise scaling gives bf16 on every FP8 GPU; a bf16 bias fuses into the GEMM
            fused = self.bias is not None and self.bias.dtype == torch.bfloat16
            if fused and n != self.weight.shape[0]:
                bias = F.pad(self.bias, (0, self.weight.shape[0] - n))
            else:
                bias = self.bias if fused else None
            out = torch._scaled_mm(
                q, self.weight.T, scale_a=s, scale_b=self.weight_scale, bias=bias,
                out_dtype=torch.bfloat16,
            )  # fmt: skip
        else:  # float32 output on the CPU: equal to the reference to float32 rounding
            fused = False
            out = torch._scaled_mm(
                q, self.weight.T, scale_a=s, scale_b=self.weight_scale, out_dtype=torch.float32
            )
        if n != out.shape[1]:
            out = out[:, :n]
        if self.bias is not None and not fused:
            out = out.float() + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _cpu_scaled_mm() -> bool:
    """Whether this build's CPU ``_scaled_mm`` takes row-wise scales (probed once)."""
    global _cpu_scaled_mm_works
    if _cpu_scaled_mm_works is None:
        a = torch.ones(2, 16).to(FP8)
        try:
            out = torch._scaled_mm(
                a, a.T, scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32
            )
            _cpu_scaled_mm_works = bool((out == 16).all())
        except (RuntimeError, NotImplementedError):
            _cpu_scaled_mm_works = False
    return _cpu_scaled_mm_works


def float8_layers(model: nn.Module) -> list[str]:
    """Names of the model's :class:`Float8Linear` modules."""
    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def to_float8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every ``nn.Linear`` inside ``model.blocks`` replaced by a
    :class:`Float8Linear` (a deep copy unless ``inplace``). The embeddings and the score or LM
    head stay as they are: they are a small share of the FLOPs and the most sensitive to
    precision. Convert after any ``.to(device, dtype)``: the copy quantises the weights as
    they are then. Inference only: the fp8 layers have no gradients."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(
            f"to_float8 converts the linear layers of `model.blocks`; {type(model).__name__} "
            "has no such module"
        )
    p = next(model.parameters(), None)
    if p is not None:
        check_fp8_device(p.device)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = model.blocks
    targets = [(n, m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, Float8Linear.from_linear(lin))
    return model
