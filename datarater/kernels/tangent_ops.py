"""Forward-over-reverse building blocks of the transformer: value, tangent, backward and the
backward's tangent of GELU and of the attention softmax, each in one fused pass.

The functions here are the plain-torch reference (any device and dtype); on CPU float32 tensors
they dispatch to the fused C++ kernels of ``csrc/cpu/tangent_ops.cpp``. Used by the
hand-written pass in :mod:`datarater.models.forward_over_reverse`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._ext import extension

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _fused(*tensors: Tensor) -> bool:
    return extension() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def gelu_fwd_tangent_reference(u: Tensor, du: Tensor):
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT2))
    pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
    g1 = cdf + u * pdf
    return u * cdf, g1 * du, g1, pdf * (2.0 - u * u)


def gelu_fwd_tangent(u: Tensor, du: Tensor):
    """(gelu(u), gelu'(u) du, gelu'(u), gelu''(u)) for the exact (erf) GELU."""
    if _fused(u, du):
        return tuple(extension().gelu_fwd_tangent(u, du))
    return gelu_fwd_tangent_reference(u, du)


def gelu_bwd_tangent_reference(ga, dga, g1, g2, du):
    return ga * g1, dga * g1 + ga * g2 * du


def gelu_bwd_tangent(ga: Tensor, dga: Tensor, g1: Tensor, g2: Tensor, du: Tensor):
    """(gu, dgu) = (ga gelu', dga gelu' + ga gelu'' du)."""
    if _fused(ga, dga, g1, g2, du):
        return tuple(extension().gelu_bwd_tangent(ga, dga, g1, g2, du))
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
    if _fused(s, ds):
        return tuple(extension().softmax_fwd_tangent(s, ds, scale, causal))
    return softmax_fwd_tangent_reference(s, ds, scale, causal)


def softmax_bwd_tangent_reference(a, da, ga, dga, scale: float):
    rho = (a * ga).sum(-1, keepdim=True)
    drho = (da * ga + a * dga).sum(-1, keepdim=True)
    return scale * a * (ga - rho), scale * (da * (ga - rho) + a * (dga - drho))


def softmax_bwd_tangent(a: Tensor, da: Tensor, ga: Tensor, dga: Tensor, scale: float):
    """Gradient in the raw scores s (scale folded in) and its tangent."""
    if _fused(a, da, ga, dga):
        return tuple(extension().softmax_bwd_tangent(a, da, ga, dga, scale))
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
    if _fused(x, dx, gamma, dgamma, beta, dbeta):
        y, dy, xh, dxh, r, m = extension().layer_norm_fwd_tangent(
            x, dx, gamma, dgamma, beta, dbeta, eps
        )
        return y, dy, (xh, dxh, r[:, None], m[:, None])
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
    return gx, dgx, (dgy * xh + gy * dxh).sum(0), dgy.sum(0)


def layer_norm_bwd_tangent(gy, dgy, saved, gamma, dgamma):
    """(gx, its tangent, tangent of the gamma gradient, tangent of the beta gradient)."""
    xh, dxh, r, m = saved
    if _fused(gy, dgy, xh, dxh, gamma, dgamma) and r.is_contiguous() and m.is_contiguous():
        return tuple(
            extension().layer_norm_bwd_tangent(
                gy, dgy, xh, dxh, r.reshape(-1), m.reshape(-1), gamma, dgamma
            )
        )
    return layer_norm_bwd_tangent_reference(gy, dgy, saved, gamma, dgamma)
