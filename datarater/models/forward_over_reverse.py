"""The library's causal LM differentiated by hand in forward-over-reverse mode.

``meta_step`` needs, per inner step and along a direction v in parameter space, the tangent of
the inner gradient (the Hessian-vector product H v) and each sequence's loss tangent
c_i = grad l_i . v. ``torch.func.jvp(torch.func.grad(...))`` gets both generically, but it
differentiates every backward kernel through generic decompositions and also computes primal
parameter gradients nobody needs. This module writes the four sweeps out for
:class:`~datarater.models.CausalLM`: primal and tangent forward, then primal and tangent
backward (input gradients only, plus the tangents of the parameter gradients). It is checked
against ``torch.func`` in float64 in the tests.

Notation: for every activation ``x`` its tangent is ``dx``; ``g*`` is a gradient (adjoint) and
``dg*`` its tangent. Matrices multiply rows of tokens: ``[N, D]`` with N = batch x length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import select_backend

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# building blocks: forward with tangent, backward with tangent


def _linear(h: Tensor, dh: Tensor, w: Tensor, dw: Tensor, b: Tensor | None, db: Tensor | None):
    y = h @ w.T if b is None else torch.addmm(b, h, w.T)
    dy = torch.addmm(dh @ w.T, h, dw.T)
    if db is not None:
        dy = dy + db
    return y, dy


def _linear_back(gy: Tensor, dgy: Tensor, h: Tensor, dh: Tensor, w: Tensor, dw: Tensor):
    """Input gradient and its tangent, and the tangent of the weight and bias gradients."""
    gh = gy @ w
    dgh = torch.addmm(dgy @ w, gy, dw)
    dgw = torch.addmm(dgy.T @ h, gy.T, dh)
    return gh, dgh, dgw, dgy.sum(0)


def _layer_norm(x: Tensor, dx: Tensor, gamma, dgamma, beta, dbeta, eps: float):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xh = xc * r
    m_xdx = (xh * dx).mean(-1, keepdim=True)
    dxh = r * (dx - dx.mean(-1, keepdim=True) - xh * m_xdx)
    y = torch.addcmul(beta, xh, gamma)
    dy = dxh * gamma + xh * dgamma + dbeta
    return y, dy, (xh, dxh, r, m_xdx)


def _layer_norm_back(gy: Tensor, dgy: Tensor, saved, gamma: Tensor, dgamma: Tensor):
    xh, dxh, r, m_xdx = saved
    a = gy * gamma
    da = dgy * gamma + gy * dgamma
    m_a = a.mean(-1, keepdim=True)
    m_axh = (a * xh).mean(-1, keepdim=True)
    inner = a - m_a - xh * m_axh
    gx = r * inner
    d_inner = (
        da
        - da.mean(-1, keepdim=True)
        - dxh * m_axh
        - xh * ((da * xh).mean(-1, keepdim=True) + (a * dxh).mean(-1, keepdim=True))
    )
    dgx = r * (d_inner - r * m_xdx * inner)  # dr = -r^2 m_xdx
    dgamma_g = (dgy * xh + gy * dxh).sum(0)
    dbeta_g = dgy.sum(0)
    return gx, dgx, dgamma_g, dbeta_g


def _gelu_derivatives(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gelu(u), gelu'(u), gelu''(u) for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT2))
    pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
    return u * cdf, cdf + u * pdf, pdf * (2.0 - u * u)


def _attention(q, dq, k, dk, v, dv, scale: float, causal: Tensor):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(causal, float("-inf"))
    a = s.softmax(-1)
    ds = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) * scale
    da = a * (ds - (a * ds).sum(-1, keepdim=True))
    o = a @ v
    do = da @ v + a @ dv
    return o, do, (a, da)


def _attention_back(go, dgo, saved, q, dq, k, dk, v, dv, scale: float):
    a, da = saved
    ga = go @ v.transpose(-1, -2)
    dga = dgo @ v.transpose(-1, -2) + go @ dv.transpose(-1, -2)
    gv = a.transpose(-1, -2) @ go
    dgv = da.transpose(-1, -2) @ go + a.transpose(-1, -2) @ dgo
    rho = (a * ga).sum(-1, keepdim=True)
    drho = (da * ga + a * dga).sum(-1, keepdim=True)
    gs = a * (ga - rho)
    dgs = da * (ga - rho) + a * (dga - drho)
    gq = (gs @ k) * scale
    dgq = (dgs @ k + gs @ dk) * scale
    gk = (gs.transpose(-1, -2) @ q) * scale
    dgk = (dgs.transpose(-1, -2) @ q + gs.transpose(-1, -2) @ dq) * scale
    return gq, dgq, gk, dgk, gv, dgv


# ---------------------------------------------------------------------------------------------
# the whole model


@torch.no_grad()
def causal_lm_hvp(
    model,
    params: dict[str, Tensor],
    tangents: dict[str, Tensor],
    input_ids: Tensor,
    targets: Tensor,
    token_weights: Tensor,
    seq_weights: Tensor,
    loss_backend: str | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """H v of J = sum_i w_i l_i and c_i = grad l_i . v for a :class:`CausalLM`.

    ``params``/``tangents`` map parameter names to tensors (missing names: the module's own
    tensor with a zero tangent). ``targets``/``token_weights`` are [B, L] as in ``SeqBatch``
    (l_i = sum_t token_weights[i, t] * ce[i, t]); ``seq_weights`` is w [B].
    Returns ({name: H v} for the names in ``params``, c [B]).
    """
    cfg = model.cfg
    own = dict(model.named_parameters())

    def p(name: str) -> Tensor:
        return params[name] if name in params else own[name].detach()

    def t(name: str) -> Tensor:
        return tangents[name] if name in tangents else torch.zeros_like(p(name))

    b, n = input_ids.shape
    d, h = cfg.d_model, cfg.n_heads
    dh_ = d // h
    scale = 1.0 / math.sqrt(dh_)
    causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).triu(1)
    ids = input_ids.reshape(-1)
    out_name = "tok.weight" if model.lm_head is None else "lm_head.weight"

    # ---- forward, primal and tangent --------------------------------------------------------
    x = (p("tok.weight")[ids].view(b, n, d) + p("pos.weight")[:n]).view(b * n, d)
    dx = (t("tok.weight")[ids].view(b, n, d) + t("pos.weight")[:n]).view(b * n, d)
    saved = []
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}."
        h1, dh1, ln1 = _layer_norm(
            x,
            dx,
            p(pre + "ln1.weight"),
            t(pre + "ln1.weight"),
            p(pre + "ln1.bias"),
            t(pre + "ln1.bias"),
            1e-5,
        )
        qkv, dqkv = _linear(
            h1,
            dh1,
            p(pre + "attn.qkv.weight"),
            t(pre + "attn.qkv.weight"),
            p(pre + "attn.qkv.bias"),
            t(pre + "attn.qkv.bias"),
        )

        def heads(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return y.view(b, n, 3, h, dh_).permute(2, 0, 3, 1, 4).unbind(0)

        (q, k, v), (dq, dk, dv) = heads(qkv), heads(dqkv)
        o, do, att = _attention(q, dq, k, dk, v, dv, scale, causal)
        om = o.transpose(1, 2).reshape(b * n, d)
        dom = do.transpose(1, 2).reshape(b * n, d)
        y, dy = _linear(
            om,
            dom,
            p(pre + "attn.proj.weight"),
            t(pre + "attn.proj.weight"),
            p(pre + "attn.proj.bias"),
            t(pre + "attn.proj.bias"),
        )
        x, dx = x + y, dx + dy
        h2, dh2, ln2 = _layer_norm(
            x,
            dx,
            p(pre + "ln2.weight"),
            t(pre + "ln2.weight"),
            p(pre + "ln2.bias"),
            t(pre + "ln2.bias"),
            1e-5,
        )
        u, du = _linear(
            h2,
            dh2,
            p(pre + "fc.weight"),
            t(pre + "fc.weight"),
            p(pre + "fc.bias"),
            t(pre + "fc.bias"),
        )
        act, g1, g2 = _gelu_derivatives(u)
        dact = g1 * du
        y, dy = _linear(
            act,
            dact,
            p(pre + "out.weight"),
            t(pre + "out.weight"),
            p(pre + "out.bias"),
            t(pre + "out.bias"),
        )
        x, dx = x + y, dx + dy
        saved.append(
            (
                h1,
                dh1,
                ln1,
                q,
                dq,
                k,
                dk,
                v,
                dv,
                att,
                om,
                dom,
                h2,
                dh2,
                ln2,
                u,
                du,
                act,
                dact,
                g1,
                g2,
            )
        )
    hf, dhf, lnf = _layer_norm(
        x, dx, p("ln_f.weight"), t("ln_f.weight"), p("ln_f.bias"), t("ln_f.bias"), 1e-5
    )
    w_out, dw_out = p(out_name), t(out_name)
    z, dz = _linear(hf, dhf, w_out, dw_out, None, None)

    # ---- loss: tangents of per-token losses, gradient of J and its tangent -------------------
    # Three streaming passes of the loss kernels over z (design.md 3.1), no N x V temporaries
    # beyond the two gradients: lse; gz = tw (p - e_y); dgz = tw (p dz - p (p . dz)) and
    # dce = p . dz - dz_y.
    prim = select_backend(z, loss_backend)
    y_flat = targets.reshape(-1)
    tw = (token_weights * seq_weights[:, None]).reshape(-1)
    _, lse, _ = prim.forward(z, y_flat, None, -100)
    dce, dgz = prim.directional(z, y_flat, lse, dz, tw, None, -100, True)
    _, gz = prim.directional(z, y_flat, lse, None, None, tw, -100, True, out=z)
    c = (token_weights * dce.to(token_weights.dtype).view(b, n)).sum(1)

    # ---- backward, primal and tangent ---------------------------------------------------------
    hv: dict[str, Tensor] = {}
    ghf, dghf, dgw_out, _ = _linear_back(gz, dgz, hf, dhf, w_out, dw_out)
    del z, dz, gz, dgz
    hv[out_name] = dgw_out
    gx, dgx, hv["ln_f.weight"], hv["ln_f.bias"] = _layer_norm_back(
        ghf, dghf, lnf, p("ln_f.weight"), t("ln_f.weight")
    )
    for i in reversed(range(cfg.n_layers)):
        pre = f"blocks.{i}."
        (
            h1,
            dh1,
            ln1,
            q,
            dq,
            k,
            dk,
            v,
            dv,
            att,
            om,
            dom,
            h2,
            dh2,
            ln2,
            u,
            du,
            act,
            dact,
            g1,
            g2,
        ) = saved[i]
        # MLP
        gact, dgact, hv[pre + "out.weight"], hv[pre + "out.bias"] = _linear_back(
            gx, dgx, act, dact, p(pre + "out.weight"), t(pre + "out.weight")
        )
        gu = gact * g1
        dgu = dgact * g1 + gact * g2 * du
        gh2, dgh2, hv[pre + "fc.weight"], hv[pre + "fc.bias"] = _linear_back(
            gu, dgu, h2, dh2, p(pre + "fc.weight"), t(pre + "fc.weight")
        )
        gl, dgl, hv[pre + "ln2.weight"], hv[pre + "ln2.bias"] = _layer_norm_back(
            gh2, dgh2, ln2, p(pre + "ln2.weight"), t(pre + "ln2.weight")
        )
        gx, dgx = gx + gl, dgx + dgl
        # attention
        gom, dgom, hv[pre + "attn.proj.weight"], hv[pre + "attn.proj.bias"] = _linear_back(
            gx, dgx, om, dom, p(pre + "attn.proj.weight"), t(pre + "attn.proj.weight")
        )

        def split(y: Tensor) -> Tensor:
            return y.view(b, n, h, dh_).transpose(1, 2)

        gq, dgq, gk, dgk, gv, dgv = _attention_back(
            split(gom), split(dgom), att, q, dq, k, dk, v, dv, scale
        )

        def merge(a_: Tensor, b_: Tensor, c_: Tensor) -> Tensor:
            return torch.stack([a_, b_, c_]).permute(1, 3, 0, 2, 4).reshape(b * n, 3 * d)

        gqkv, dgqkv = merge(gq, gk, gv), merge(dgq, dgk, dgv)
        gh1, dgh1, hv[pre + "attn.qkv.weight"], hv[pre + "attn.qkv.bias"] = _linear_back(
            gqkv, dgqkv, h1, dh1, p(pre + "attn.qkv.weight"), t(pre + "attn.qkv.weight")
        )
        gl, dgl, hv[pre + "ln1.weight"], hv[pre + "ln1.bias"] = _layer_norm_back(
            gh1, dgh1, ln1, p(pre + "ln1.weight"), t(pre + "ln1.weight")
        )
        gx, dgx = gx + gl, dgx + dgl
    # embeddings
    dg_tok = torch.zeros_like(p("tok.weight")).index_add_(0, ids, dgx)
    if out_name == "tok.weight":
        dg_tok = dg_tok + hv["tok.weight"]
    hv["tok.weight"] = dg_tok
    dg_pos = torch.zeros_like(p("pos.weight"))
    dg_pos[:n] = dgx.view(b, n, d).sum(0)
    hv["pos.weight"] = dg_pos
    return {k: hv[k] for k in params}, c
