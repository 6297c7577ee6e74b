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
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..kernels import select_backend
from ..kernels.attention import (
    backward_with_tangent,
    forward_with_tangent,
    written_out_by_default,
)
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
    """``h W^T + b`` and its tangent, in the weights' dtype (the compute dtype)."""
    h, dh = h.to(w.dtype), dh.to(w.dtype)
    y = h @ w.T
    if b is not None:
        y += b
    dy = (dh @ w.T).addmm_(h, dw.T)
    if db is not None:
        dy += db
    return y, dy


def _linear_back(gy: Tensor, dgy: Tensor, h: Tensor, dh: Tensor, w: Tensor, dw: Tensor):
    """Input gradient and its tangent, and the tangent of the weight and bias gradients, in the
    weights' dtype."""
    gy, dgy, h, dh = (t.to(w.dtype) for t in (gy, dgy, h, dh))
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


class _WrittenAttention:
    """Causal attention with L x L scores and their tangents (``attention="written"``):
    inputs ``[B, H, L, d]`` (contiguous), outputs too."""

    merged = False  # outputs [B, H, L, d]

    @staticmethod
    def forward(q, dq, k, dk, v, dv, scale: float):
        q, dq, k, dk, v, dv = (t.contiguous() for t in (q, dq, k, dk, v, dv))
        kt, dkt = k.transpose(-1, -2), dk.transpose(-1, -2)
        s = q @ kt
        ds = _bmm2(dq, kt, q, dkt)
        a, da = softmax_fwd_tangent(s, ds, scale, causal=True)
        return a @ v, _bmm2(da, v, a, dv), (a, da, q, dq, k, dk, v, dv)

    @staticmethod
    def backward(go, dgo, saved, scale: float):
        return _written_attention_back(go.contiguous(), dgo.contiguous(), *saved, scale)


class _FusedAttention:
    """Causal attention by :func:`datarater.kernels.attention`'s passes: each row's
    log-sum-exp is kept, no score; outputs and output gradients are ``[B, L, H, d]``."""

    merged = True

    @staticmethod
    def forward(q, dq, k, dk, v, dv, scale: float):
        return forward_with_tangent(q, k, v, dq, dk, dv, causal=True, scale=scale)

    @staticmethod
    def backward(go, dgo, saved, scale: float):
        return backward_with_tangent(saved, go, dgo)


def _written_attention_back(go, dgo, a, da, q, dq, k, dk, v, dv, scale: float):
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
    return gq, gk, gv, dgq, dgk, dgv


# ---------------------------------------------------------------------------------------------
# the whole model


class _Weights:
    """Parameter and tangent lookup by name; names absent from ``params`` are frozen: the
    module's own tensor, with a zero tangent (and no H v entry). Linear layers read them cast
    to ``compute`` (their matmuls run in it); embeddings and LayerNorm read them as they are,
    as autocast leaves them (``master``)."""

    def __init__(self, model, params: dict[str, Tensor], tangents: dict[str, Tensor],
                 compute: torch.dtype | None = None) -> None:  # fmt: skip
        self.own = dict(model.named_parameters())
        self.params, self.tangents, self.compute = params, tangents, compute
        self.hv: dict[str, Tensor] = {}
        self._cast: dict[tuple[str, str], Tensor] = {}

    def master(self, name: str) -> Tensor:
        return self.params[name] if name in self.params else self.own[name].detach()

    def master_t(self, name: str) -> Tensor:
        if name in self.tangents:
            return self.tangents[name]
        return torch.zeros_like(self.master(name))

    def p(self, name: str) -> Tensor:
        """The parameter as matmuls take it (cast once per call)."""
        return self._compute("p", name, self.master)

    def t(self, name: str) -> Tensor:
        return self._compute("t", name, self.master_t)

    def _compute(self, kind: str, name: str, get) -> Tensor:
        if self.compute is None:
            return get(name)
        key = (kind, name)
        if key not in self._cast:
            self._cast[key] = get(name).to(self.compute)
        return self._cast[key]

    def results(self, params) -> dict[str, Tensor]:
        """H v in the parameters' own dtypes."""
        return {k: self.hv[k].to(params[k].dtype) for k in params}

    def linear(self, name: str, h: Tensor, dh: Tensor, bias: bool = True):
        w, b = name + ".weight", name + ".bias"
        return _linear(
            h, dh, self.p(w), self.t(w), self.p(b) if bias else None, self.t(b) if bias else None
        )

    def linear_back(self, name: str, gy: Tensor, dgy: Tensor, h: Tensor, dh: Tensor):
        w = name + ".weight"
        gh, dgh, self.hv[w], self.hv[name + ".bias"] = _linear_back(
            gy, dgy, h, dh, self.p(w), self.t(w)
        )
        return gh, dgh

    def norm(self, name: str, x: Tensor, dx: Tensor):
        w, b = name + ".weight", name + ".bias"
        m, mt = self.master, self.master_t
        return layer_norm_fwd_tangent(x, dx, m(w), mt(w), m(b), mt(b), 1e-5)

    def norm_output(self, name: str, saved) -> tuple[Tensor, Tensor]:
        """LayerNorm's output and its tangent again, from its saved normalised input."""
        xh, dxh = saved[0], saved[1]
        w, b = name + ".weight", name + ".bias"
        m, mt = self.master, self.master_t
        y = torch.addcmul(m(b), xh, m(w))
        dy = torch.addcmul(mt(b), dxh, m(w)).addcmul_(xh, mt(w))
        return y, dy

    def norm_back(self, name: str, gy: Tensor, dgy: Tensor, saved):
        """In LayerNorm's own dtype, as its forward ran (the gradients come from matmuls)."""
        w, dtype = name + ".weight", saved[0].dtype
        gx, dgx, self.hv[w], self.hv[name + ".bias"] = layer_norm_bwd_tangent(
            gy.to(dtype), dgy.to(dtype), saved, self.master(w), self.master_t(w)
        )
        return gx, dgx


def computes_as_written(model) -> bool:
    """Whether ``model`` (a CausalLM) computes exactly what ``causal_lm_hvp`` writes out: the
    library's modules of the exact types it builds, with their settings (LayerNorm's eps and
    affine terms, causal attention, plain embeddings and biased linears), and no hooks. A
    changed model takes the generic pass instead: a wrong pass would give a wrong
    meta-gradient without an error."""
    from torch import nn
    from torch.nn.modules import module as nn_module

    from .transformer import Attention, Block

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        return False
    if any(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in vars(m)  # a forward set on the instance
        for m in model.modules()
    ):
        return False

    def exact(m, kind) -> bool:
        return type(m) is kind

    def linear(m, bias: bool = True) -> bool:
        return exact(m, nn.Linear) and (m.bias is not None) == bias

    def norm(m) -> bool:
        return (
            exact(m, nn.LayerNorm)
            and m.eps == 1e-5
            and m.weight is not None
            and (m.bias is not None)
        )

    def embedding(m) -> bool:
        return (
            exact(m, nn.Embedding)
            and m.padding_idx is None
            and m.max_norm is None
            and not (m.scale_grad_by_freq or m.sparse)
        )

    cfg = model.cfg
    blocks_ok = exact(model.blocks, nn.ModuleList) and len(model.blocks) == cfg.n_layers
    blocks_ok = blocks_ok and all(
        exact(blk, Block)
        and exact(blk.attn, Attention)
        and blk.attn.causal
        and blk.attn.kind == cfg.attention
        and blk.attn.n_heads == cfg.n_heads
        and all(linear(m) for m in (blk.attn.qkv, blk.attn.proj, blk.fc, blk.out))
        and norm(blk.ln1)
        and norm(blk.ln2)
        for blk in model.blocks
    )
    head_ok = model.lm_head is None or linear(model.lm_head, bias=False)
    return (
        blocks_ok and head_ok and embedding(model.tok) and embedding(model.pos) and norm(model.ln_f)
    )


@dataclass(frozen=True)
class PassOptions:
    """How the pass computes: the loss kernels' backend, the dtype its matmuls (and attention)
    run in (None: the parameters'; LayerNorm, the residual stream and the embeddings stay in
    the parameters' dtype, as under autocast), and block rematerialisation (keep each block's
    input and its tangent, recompute the block on the way back: one block's activations are
    live at a time, for about a third more of the pass's matmuls)."""

    loss_backend: str | None = None
    compute_dtype: torch.dtype | None = None
    remat: bool = False


@torch.no_grad()
def causal_lm_hvp(
    model,
    params: dict[str, Tensor],
    tangents: dict[str, Tensor],
    input_ids: Tensor,
    targets: Tensor,
    token_weights: Tensor,
    seq_weights: Tensor,
    options: PassOptions | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """H v of J = sum_i w_i l_i and c_i = grad l_i . v for a :class:`CausalLM`.

    ``params``/``tangents`` map parameter names to tensors (missing names: the module's own
    tensor with a zero tangent). ``targets``/``token_weights`` are [B, L] as in ``SeqBatch``
    (l_i = sum_t token_weights[i, t] * ce[i, t]); ``seq_weights`` is w [B].
    Returns ({name: H v} for the names in ``params``, c [B]).
    """
    o = options or PassOptions()
    cfg, W = model.cfg, _Weights(model, params, tangents, o.compute_dtype)
    b, n = input_ids.shape
    fused = cfg.attention == "fused" and not written_out_by_default(n, input_ids.device)
    shape = _Shape(b, n, cfg.d_model, cfg.n_heads, _FusedAttention if fused else _WrittenAttention)
    ids = input_ids.reshape(-1)
    tied = model.lm_head is None or model.lm_head.weight is model.tok.weight
    out_name = "tok.weight" if tied else "lm_head.weight"

    m, mt = W.master, W.master_t
    x = (m("tok.weight")[ids].view(b, n, -1) + m("pos.weight")[:n]).view(b * n, -1)
    dx = (mt("tok.weight")[ids].view(b, n, -1) + mt("pos.weight")[:n]).view(b * n, -1)
    kept = []  # per block: what its backward reads, or (remat) its input and that's tangent
    for i in range(cfg.n_layers):
        x_in, dx_in = x, dx
        x, dx, saved = _block_forward(W, f"blocks.{i}.", x, dx, shape)
        kept.append((x_in, dx_in) if o.remat else saved)
        del saved, x_in, dx_in
    hf, dhf, lnf = W.norm("ln_f", x, dx)
    w_out, dw_out = W.p(out_name), W.t(out_name)
    z, dz = _linear(hf, dhf, w_out, dw_out, None, None)
    gz, dgz, c = _loss_gradient_and_tangents(z, dz, targets, token_weights, seq_weights,
                                             o.loss_backend)  # fmt: skip
    ghf, dghf, W.hv[out_name], _ = _linear_back(gz, dgz, hf, dhf, w_out, dw_out)
    del z, dz, gz, dgz, x, dx, hf, dhf
    gx, dgx = W.norm_back("ln_f", ghf, dghf, lnf)
    del ghf, dghf, lnf
    for i in reversed(range(cfg.n_layers)):
        pre, saved = f"blocks.{i}.", kept.pop()
        if o.remat:  # the block again, from its input
            saved = _block_forward(W, pre, *saved, shape)[2]
        gx, dgx = _block_backward(W, pre, gx, dgx, saved, shape)
        del saved
    _embedding_back(W, ids, dgx, b, n, out_name)
    return W.results(params), c


def _embedding_back(W: _Weights, ids: Tensor, dgx: Tensor, b: int, n: int, out_name: str):
    """The embeddings' H v (and the tied output projection's sum)."""
    dgx = dgx.to(W.master("tok.weight").dtype)
    dg_tok = torch.zeros_like(W.master("tok.weight")).index_add_(0, ids, dgx)
    tied = out_name == "tok.weight"
    W.hv["tok.weight"] = dg_tok + W.hv["tok.weight"].to(dg_tok.dtype) if tied else dg_tok
    dg_pos = torch.zeros_like(W.master("pos.weight"))
    dg_pos[:n] = dgx.view(b, n, -1).sum(0)
    W.hv["pos.weight"] = dg_pos


@dataclass(frozen=True)
class _Shape:
    """The batch's and the model's sizes, and which attention the blocks run."""

    b: int
    n: int
    d: int
    h: int
    att: type

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d // self.h)

    def heads(self, y: Tensor) -> list[Tensor]:  # [N, 3d] -> q, k, v: [B, H, L, d/h] views
        return list(y.view(self.b, self.n, 3, self.h, self.d // self.h).permute(2, 0, 3, 1, 4))

    def merge_heads(self, y: Tensor) -> Tensor:  # the attention's output -> [N, d]
        return (y if self.att.merged else y.transpose(1, 2)).reshape(self.b * self.n, self.d)

    def split_heads(self, y: Tensor) -> Tensor:  # [N, d] -> the output gradient's layout
        y = y.view(self.b, self.n, self.h, self.d // self.h)
        return y if self.att.merged else y.transpose(1, 2)

    def stack_heads(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # inverse of heads()
        return torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(self.b * self.n, 3 * self.d)


def _block_forward(W: _Weights, pre: str, x: Tensor, dx: Tensor, shape: _Shape):
    """One transformer block, primal and tangent; returns what its backward reads. Elementwise
    results (LayerNorm's outputs, GELU's output and derivatives) are not kept: the backward
    recomputes them from what is (LayerNorm's normalised input, GELU's input), as a plain
    backward keeps only GELU's input too."""
    L = SimpleNamespace()
    h1, dh1, L.ln1 = W.norm(pre + "ln1", x, dx)
    qkv, dqkv = W.linear(pre + "attn.qkv", h1, dh1)
    del h1, dh1
    (q, k, v), (dq, dk, dv) = shape.heads(qkv), shape.heads(dqkv)
    o, do, L.att = shape.att.forward(q, dq, k, dk, v, dv, shape.scale)
    L.om, L.dom = shape.merge_heads(o), shape.merge_heads(do)
    y, dy = W.linear(pre + "attn.proj", L.om, L.dom)
    x, dx = x + y, dx + dy
    h2, dh2, L.ln2 = W.norm(pre + "ln2", x, dx)
    L.u, L.du = W.linear(pre + "fc", h2, dh2)
    del h2, dh2
    act, dact, _, _ = gelu_fwd_tangent(L.u, L.du)
    y, dy = W.linear(pre + "out", act, dact)
    return x + y, dx + dy, L


def _block_backward(W: _Weights, pre: str, gx: Tensor, dgx: Tensor, L, shape: _Shape):
    """One block's input gradient and its tangent; the tangents of its parameters' gradients
    go to ``W.hv``."""
    act, dact, g1, g2 = gelu_fwd_tangent(L.u, L.du)
    gact, dgact = W.linear_back(pre + "out", gx, dgx, act, dact)
    del act, dact
    gu, dgu = gelu_bwd_tangent(gact, dgact, g1, g2, L.du)
    del gact, dgact, g1, g2, L.u, L.du  # (each saved tensor goes as soon as it is read)
    gh2, dgh2 = W.linear_back(pre + "fc", gu, dgu, *W.norm_output(pre + "ln2", L.ln2))
    del gu, dgu
    gl, dgl = W.norm_back(pre + "ln2", gh2, dgh2, L.ln2)
    del gh2, dgh2, L.ln2
    gx, dgx = gx + gl, dgx + dgl
    gom, dgom = W.linear_back(pre + "attn.proj", gx, dgx, L.om, L.dom)
    del L.om, L.dom
    gq, gk, gv, dgq, dgk, dgv = shape.att.backward(
        shape.split_heads(gom), shape.split_heads(dgom), L.att, shape.scale
    )
    del gom, dgom, L.att
    gh1, dgh1 = W.linear_back(
        pre + "attn.qkv", shape.stack_heads(gq, gk, gv), shape.stack_heads(dgq, dgk, dgv),
        *W.norm_output(pre + "ln1", L.ln1),
    )  # fmt: skip
    gl, dgl = W.norm_back(pre + "ln1", gh1, dgh1, L.ln1)
    return gx + gl, dgx + dgl


def _loss_gradient_and_tangents(z, dz, targets, token_weights, seq_weights, loss_backend):
    """``(gz, dgz, c)``: the gradient of J in the logits, its tangent, and each sequence's loss
    tangent. Three streaming passes of the loss kernels over z (design.md 3.1), no N x V
    temporaries beyond the two gradients: lse; gz = tw (p - e_y); dgz = tw (p dz - p (p . dz))
    and dce = p . dz - dz_y. ``gz`` overwrites z."""
    b, n = targets.shape
    prim = select_backend(z, loss_backend)
    y_flat = targets.reshape(-1)
    tw = (token_weights * seq_weights[:, None]).reshape(-1)
    _, lse, _ = prim.forward(z, y_flat, None, -100)
    dce, dgz = prim.directional(z, y_flat, lse, dz, tw, None, -100, True)
    _, gz = prim.directional(z, y_flat, lse, None, None, tw, -100, True, out=z)
    c = (token_weights * dce.to(token_weights.dtype).view(b, n)).sum(1)
    return gz, dgz, c
