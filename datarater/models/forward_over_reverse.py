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
from ..kernels.tangent_ops import (
    gelu_bwd_tangent,
    gelu_fwd_tangent,
    layer_norm_bwd_tangent,
    layer_norm_fwd_tangent,
    softmax_bwd_tangent,
    softmax_fwd_tangent,
)

# ---------------------------------------------------------------------------------------------
# building blocks: forward with tangent, backward with tangent


def _linear(h: Tensor, dh: Tensor, w: Tensor, dw: Tensor, b: Tensor | None, db: Tensor | None):
    y = h @ w.T
    if b is not None:
        y += b
    dy = (dh @ w.T).addmm_(h, dw.T)
    if db is not None:
        dy += db
    return y, dy


def _linear_back(gy: Tensor, dgy: Tensor, h: Tensor, dh: Tensor, w: Tensor, dw: Tensor):
    """Input gradient and its tangent, and the tangent of the weight and bias gradients."""
    gh = gy @ w
    dgh = (dgy @ w).addmm_(gy, dw)
    dgw = (dgy.T @ h).addmm_(gy.T, dh)
    return gh, dgh, dgw, dgy.sum(0)


def _bmm2(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """a @ b + c @ d over the leading (batch, head) dimensions, accumulated in place."""
    lead = a.shape[:-2]
    out = torch.bmm(a.flatten(0, -3), b.flatten(0, -3))
    out.baddbmm_(c.flatten(0, -3), d.flatten(0, -3))
    return out.view(*lead, *out.shape[-2:])


def _attention(q, dq, k, dk, v, dv, scale: float):
    kt, dkt = k.transpose(-1, -2), dk.transpose(-1, -2)
    s = q @ kt
    ds = _bmm2(dq, kt, q, dkt)
    a, da = softmax_fwd_tangent(s, ds, scale, causal=True)
    return a @ v, _bmm2(da, v, a, dv), (a, da)


def _attention_back(go, dgo, saved, q, dq, k, dk, v, dv, scale: float):
    a, da = saved
    vt, dvt, at, dat = (
        v.transpose(-1, -2),
        dv.transpose(-1, -2),
        a.transpose(-1, -2),
        da.transpose(-1, -2),
    )
    ga = go @ vt
    dga = _bmm2(dgo, vt, go, dvt)
    gv = at @ go
    dgv = _bmm2(dat, go, at, dgo)
    gs, dgs = softmax_bwd_tangent(a, da, ga, dga, scale)  # scale folded in
    gst, dgst = gs.transpose(-1, -2), dgs.transpose(-1, -2)
    gq = gs @ k
    dgq = _bmm2(dgs, k, gs, dk)
    gk = gst @ q
    dgk = _bmm2(dgst, q, gst, dq)
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
    ids = input_ids.reshape(-1)
    out_name = "tok.weight" if model.lm_head is None else "lm_head.weight"

    # ---- forward, primal and tangent --------------------------------------------------------
    x = (p("tok.weight")[ids].view(b, n, d) + p("pos.weight")[:n]).view(b * n, d)
    dx = (t("tok.weight")[ids].view(b, n, d) + t("pos.weight")[:n]).view(b * n, d)
    saved = []
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}."
        h1, dh1, ln1 = layer_norm_fwd_tangent(
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
            # one copy per tensor here saves several inside the batched matmuls
            return tuple(t.contiguous() for t in y.view(b, n, 3, h, dh_).permute(2, 0, 3, 1, 4))

        (q, k, v), (dq, dk, dv) = heads(qkv), heads(dqkv)
        o, do, att = _attention(q, dq, k, dk, v, dv, scale)
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
        h2, dh2, ln2 = layer_norm_fwd_tangent(
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
        act, dact, g1, g2 = gelu_fwd_tangent(u, du)
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
    hf, dhf, lnf = layer_norm_fwd_tangent(
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
    gx, dgx, hv["ln_f.weight"], hv["ln_f.bias"] = layer_norm_bwd_tangent(
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
        gu, dgu = gelu_bwd_tangent(gact, dgact, g1, g2, du)
        gh2, dgh2, hv[pre + "fc.weight"], hv[pre + "fc.bias"] = _linear_back(
            gu, dgu, h2, dh2, p(pre + "fc.weight"), t(pre + "fc.weight")
        )
        gl, dgl, hv[pre + "ln2.weight"], hv[pre + "ln2.bias"] = layer_norm_bwd_tangent(
            gh2, dgh2, ln2, p(pre + "ln2.weight"), t(pre + "ln2.weight")
        )
        gx, dgx = gx + gl, dgx + dgl
        # attention
        gom, dgom, hv[pre + "attn.proj.weight"], hv[pre + "attn.proj.bias"] = _linear_back(
            gx, dgx, om, dom, p(pre + "attn.proj.weight"), t(pre + "attn.proj.weight")
        )

        def split(y: Tensor) -> Tensor:
            return y.view(b, n, h, dh_).transpose(1, 2).contiguous()

        gq, dgq, gk, dgk, gv, dgv = _attention_back(
            split(gom), split(dgom), att, q, dq, k, dk, v, dv, scale
        )

        def merge(a_: Tensor, b_: Tensor, c_: Tensor) -> Tensor:
            return torch.stack([a_, b_, c_]).permute(1, 3, 0, 2, 4).reshape(b * n, 3 * d)

        gqkv, dgqkv = merge(gq, gk, gv), merge(dgq, dgk, dgv)
        gh1, dgh1, hv[pre + "attn.qkv.weight"], hv[pre + "attn.qkv.bias"] = _linear_back(
            gqkv, dgqkv, h1, dh1, p(pre + "attn.qkv.weight"), t(pre + "attn.qkv.weight")
        )
        gl, dgl, hv[pre + "ln1.weight"], hv[pre + "ln1.bias"] = layer_norm_bwd_tangent(
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
