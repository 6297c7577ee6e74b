"""Forward-over-reverse building blocks of the transformer: value, tangent, backward and the
backward's tangent of GELU, of the attention softmax and of LayerNorm, each in one fused pass.

The ``*_reference`` functions are plain torch (any device and dtype). The public ones pick an
implementation per call (:func:`_route`): the fused C++ kernels of ``csrc/cpu/tangent_ops.cpp``
for contiguous CPU float32 tensors; the Triton kernels of :mod:`.triton_tangent` for contiguous
CUDA float32/bfloat16/float16 tensors when triton imports, unless the environment has
``DATARATER_TANGENT_TRITON=0`` (read on every call, so that one benchmark run can compare both);
the reference otherwise. Used by the hand-written pass in
:mod:`datarater.models.forward_over_reverse`.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from ._ext import extension

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
TRITON_ENV = "DATARATER_TANGENT_TRITON"


@functools.cache
def _triton() -> ModuleType | None:
    """The Triton kernels, imported on first use on a GPU (None without triton)."""
    from . import triton_tangent

    return triton_tangent if triton_tangent.AVAILABLE else None


def _route(*tensors: Tensor) -> str:
    """Which implementation a call on these tensors runs: "cpp", "triton" or "reference". The
    Triton functions check the rest (dtypes, devices, layout, row lengths) themselves and hand
    what they cannot take to the reference: one check per call on the GPU's hot path."""
    if extension() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    ):
        return "cpp"
    if (
        tensors[0].device.type == "cuda"
        and os.environ.get(TRITON_ENV, "1").strip() != "0"
        and _triton() is not None
    ):
        return "triton"
    return "reference"


def gelu_fwd_tangent_reference(u: Tensor, du: Tensor):
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT2))
    pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
    g1 = cdf + u * pdf
    return u * cdf, g1 * du, g1, pdf * (2.0 - u * u)


def gelu_fwd_tangent(u: Tensor, du: Tensor):
    """(gelu(u), gelu'(u) du, gelu'(u), gelu''(u)) for the exact (erf) GELU."""
    route = _route(u, du)
    if route == "cpp":
        return tuple(extension().gelu_fwd_tangent(u, du))
    if route == "triton":
        return _triton().gelu_fwd_tangent(u, du)
    return gelu_fwd_tangent_reference(u, du)


def gelu_bwd_tangent_reference(ga, dga, g1, g2, du):
    return ga * g1, dga * g1 + ga * g2 * du


def gelu_bwd_tangent(ga: Tensor, dga: Tensor, g1: Tensor, g2: Tensor, du: Tensor):
    """(gu, dgu) = (ga gelu', dga gelu' + ga gelu'' du)."""
    route = _route(ga, dga, g1, g2, du)
    if route == "cpp":
        return tuple(extension().gelu_bwd_tangent(ga, dga, g1, g2, du))
    if route == "triton":
        return _triton().gelu_bwd_tangent(ga, dga, g1, g2, du)
    return gelu_bwd_tangent_reference(ga, dga, g1, g2, du)


def softmax_fwd_tangent_reference(s: Tensor, ds: Tensor, scale: float, causal: bool):
    if causal:
        n = s.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    a = (s * scale).softmax(-1)
    ds = ds * scale
    return a, a * (ds - (a * ds).sum(-1, keepdim=True))


def softmax_fwd_tangent(s: Tensor, ds: Tensor, scale: float, causal: bool):
    """a = softmax(scale s) (causally masked if asked) and its tangent along ds."""
    route = _route(s, ds)
    if route == "cpp":
        return tuple(extension().softmax_fwd_tangent(s, ds, scale, causal))
    if route == "triton":
        return _triton().softmax_fwd_tangent(s, ds, scale, causal)
    return softmax_fwd_tangent_reference(s, ds, scale, causal)


def softmax_bwd_tangent_reference(a, da, ga, dga, scale: float):
    rho = (a * ga).sum(-1, keepdim=True)
    drho = (da * ga + a * dga).sum(-1, keepdim=True)
    return scale * a * (ga - rho), scale * (da * (ga - rho) + a * (dga - drho))


def softmax_bwd_tangent(a: Tensor, da: Tensor, ga: Tensor, dga: Tensor, scale: float):
    """Gradient in the raw scores s (scale folded in) and its tangent."""
    route = _route(a, da, ga, dga)
    if route == "cpp":
        return tuple(extension().softmax_bwd_tangent(a, da, ga, dga, scale))
    if route == "triton":
        return _triton().softmax_bwd_tangent(a, da, ga, dga, scale)
    return softmax_bwd_tangent_reference(a, da, ga, dga, scale)


def layer_norm_fwd_tangent_reference(x, dx, gamma, dgamma, beta, dbeta, eps: float):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xh = xc * r
    m_xdx = (xh * dx).mean(-1, keepdim=True)
    dxh = r * (dx - dx.mean(-1, keepdim=True) - xh * m_xdx)
    y = torch.addcmul(beta, xh, gamma)
    dy = dxh * gamma + xh * dgamma + dbeta
    return y, dy, (xh, dxh, r, m_xdx)


def layer_norm_fwd_tangent(x, dx, gamma, dgamma, beta, dbeta, eps: float):
    """LayerNorm of rows and its tangent; the third item is saved for the backward."""
    route = _route(x, dx, gamma, dgamma, beta, dbeta)
    if route == "cpp":
        y, dy, xh, dxh, r, m = extension().layer_norm_fwd_tangent(
            x, dx, gamma, dgamma, beta, dbeta, eps
        )
        return y, dy, (xh, dxh, r[:, None], m[:, None])
    if route == "triton":
        return _triton().layer_norm_fwd_tangent(x, dx, gamma, dgamma, beta, dbeta, eps)
    return layer_norm_fwd_tangent_reference(x, dx, gamma, dgamma, beta, dbeta, eps)


def layer_norm_bwd_tangent_reference(gy, dgy, saved, gamma, dgamma):
    xh, dxh, r, m_xdx = saved
    a = gy * gamma
    da = dgy * gamma + gy * dgamma
    m_axh = (a * xh).mean(-1, keepdim=True)
    inner = a - a.mean(-1, keepdim=True) - xh * m_axh
    d_inner = (
        da
        - da.mean(-1, keepdim=True)
        - dxh * m_axh
        - xh * ((da * xh).mean(-1, keepdim=True) + (a * dxh).mean(-1, keepdim=True))
    )
    gx = r * inner
    dgx = r * (d_inner - r * m_xdx * inner)  # dr = -r^2 mean(xh dx)
    rows = tuple(range(gy.dim() - 1))  # the parameters' gradients sum over every row

    def over_rows(t):  # (a sum over () would sum every dimension)
        return t.sum(rows) if rows else t

    return gx, dgx, over_rows(dgy * xh + gy * dxh), over_rows(dgy)


def layer_norm_bwd_tangent(gy, dgy, saved, gamma, dgamma):
    """(gx, its tangent, tangent of the gamma gradient, tangent of the beta gradient)."""
    xh, dxh, r, m = saved
    route = _route(gy, dgy, xh, dxh, r, m, gamma, dgamma)
    if route == "cpp":
        return tuple(
            extension().layer_norm_bwd_tangent(
                gy, dgy, xh, dxh, r.reshape(-1), m.reshape(-1), gamma, dgamma
            )
        )
    if route == "triton":
        return _triton().layer_norm_bwd_tangent(gy, dgy, saved, gamma, dgamma)
    return layer_norm_bwd_tangent_reference(gy, dgy, saved, gamma, dgamma)
