"""Mixed mode: one forward sweep keeps theta_t and s_t per step (never activations); one
backward sweep pulls the adjoints back through each update with a VJP and through each inner
gradient with ONE forward-over-reverse pass along a_g, which yields both the Hessian-vector
product (added to a_theta) and each example's directional derivative c_i = grad l_i . a_g
(pulled back through the softmax weights into the rater). Activations live for one micro-batch
at a time, so memory is flat in T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import grad, jvp

from ..optim import InnerOptimizer, Params, State
from .batch import SeqBatch
from .context import Prepared, Run, Tape, inner_grad, on_host
from .flat import Flat, OnViews, state_in, state_out
from .preflight import check_scores, grad_with_graph, refuse_randomness
from .state import InnerState


def mixed(run: Run, state: InnerState, inner: Prepared, outer: SeqBatch):
    fl, opt = run.fl, run.opt
    theta, s = fl.flat(state.params), state_in(opt, fl, state.opt_state)
    step, dtype = state.step, theta.dtype
    tape: list[Tape] = []
    losses, gnorms, weights = [], [], []
    for t, batch in enumerate(inner):
        rec, theta, s, loss, gnorm = _forward_step(run, theta, s, step, batch, t == 0)
        if t == 0:  # theta_0 and s_0 are the caller's: flattened again when needed
            rec = replace(rec, params=None, opt_state=None)
        tape.append(rec)
        step += 1
        losses.append(loss)
        gnorms.append(gnorm)
        weights.append(rec.weights)
    losses, gnorms = on_host(losses), on_host(gnorms)

    # The outer loss and its gradient at theta_T start the backward sweep.
    mean = torch.full((outer.size,), 1.0 / outer.size, dtype=dtype, device=theta.device)
    a_theta, outer_loss = inner_grad(run, theta, outer, mean)
    outer_loss = float(outer_loss)
    final = InnerState(fl.views(theta), run.buffers, state_out(opt, fl, s), step)
    meta = [torch.zeros_like(p) for p in run.phi]
    if not math.isfinite(outer_loss):
        return final, outer_loss, losses, gnorms, weights, meta

    zeros = {n: {k: torch.zeros_like(v) for k, v in d.items()} for n, d in s.items()}
    adj = _Adjoints(a_theta, zeros)
    del a_theta, zeros, theta  # (the adjoints are replaced step by step: no stale copies)
    s_next = s
    for t in reversed(range(len(inner))):
        rec = tape.pop()  # each step's record is dropped once it has been used
        if rec.params is None:
            rec = replace(rec, params=fl.flat(state.params),
                          opt_state=state_in(opt, fl, state.opt_state))  # fmt: skip
        _sweep_step(run, rec, s_next, inner[t], adj, meta)
        s_next = rec.opt_state
        del rec
    return final, outer_loss, losses, gnorms, weights, meta


def _forward_step(run: Run, theta: Tensor, s: State, step: int, batch: SeqBatch, first: bool):
    """One inner step of the forward sweep: its record, theta_{t+1}, s_{t+1}, loss, grad norm.
    (A function of its own: g_t and its clipped copy are freed on return.)"""
    fl, opt = run.fl, run.opt
    with torch.no_grad(), refuse_randomness("rater", first):
        w = torch.softmax(run.scores(batch).to(theta.dtype) / run.tau, 0)
    g, loss = inner_grad(run, theta, batch, w, watch=first)
    with torch.no_grad():  # the clip factor helps rebuild g_t later
        clipped, f, gnorm = opt.clip(fl.wrap(g))
        if isinstance(opt, OnViews):  # its own update, which need not be clip, then step
            new_theta, new_s = opt.update(fl.wrap(theta), fl.wrap(g), s, step + 1)
        else:
            new_theta, new_s = opt.step(fl.wrap(theta), clipped, s, step + 1)
    keep_grads = not (opt.linear_in_grads or opt.recovers_grads)
    rec = Tape(theta, s, g if keep_grads else None, f, w, step + 1)
    return rec, new_theta[fl.KEY], new_s, loss, gnorm


@dataclass
class _Adjoints:
    """The adjoints of (theta_{t+1}, s_{t+1}), held in one place and replaced as they are
    pulled back, so that no stale copy outlives its step."""

    theta: Tensor
    state: State


def _sweep_step(run: Run, rec: Tape, s_next: State, batch: SeqBatch, adj: _Adjoints, meta):
    """Pull the adjoints back through one inner step; add its part of the meta-gradient.

    A function of its own so that its temporaries (g_t, a_g, H v) are freed on return, before
    the next step's forward-over-reverse pass allocates its activations.
    """
    fl = run.fl
    g = rec.grads
    if g is None:
        g = run.opt.grads_for_vjp(rec.opt_state, s_next, fl.wrap(rec.params), rec.clip)[fl.KEY]
    adj.theta, adj.state, a_g = _update_vjp(run.opt, rec, g, adj.theta, adj.state)
    del g
    hv, c = _hvp_and_tangents(run, rec.params, batch, rec.weights, a_g)
    del a_g
    _rater_vjp(run, batch, rec.weights, c, meta)
    adj.theta.add_(hv)


def _update_vjp(opt: InnerOptimizer, rec: Tape, g: Tensor, a_theta: Tensor, a_s: State):
    """Pull (a_theta, a_s) back through U(theta_t, s_t, g_t): elementwise, so cheap."""
    key = Flat.KEY
    a_th, a_s, a_g = opt.update_vjp(
        {key: rec.params}, {key: g}, rec.opt_state, rec.step, {key: a_theta}, a_s
    )
    return a_th[key], a_s, a_g[key]


def _hvp_and_tangents(run: Run, theta: Tensor, batch: SeqBatch, w: Tensor, v: Tensor):
    """(H v, c = [grad l_i . v]_i), one pass per micro-batch.

    ``hvp="auto"``: the model's own hand-written forward-over-reverse pass when it has one (the
    library's ``CausalLM``), else ``"double"``. ``"func"``: ``torch.func.jvp`` of
    ``torch.func.grad``. ``"double"``: reverse-over-reverse of this one step, g = grad J with a
    graph, then one backward of g . v to (theta, w): H v, and c_i = d(g . v)/dw_i.
    """
    hv_total, cs = None, []
    primals, tangents = run.fl.views(theta), run.fl.views(v)
    own = getattr(run.model, "hvp_and_tangents", None) if run.hvp == "auto" else None
    for mb, wm in run.micro_batches(batch, w):
        out = None
        if own is not None and not run.buffers:
            out = own(primals, tangents, mb.input_ids, mb.targets, mb.token_weights, wm,
                      options=run.pass_options)  # fmt: skip
        if out is None and run.hvp == "func":

            def objective(p, mb=mb, wm=wm):
                l = run.losses(p, mb)
                return (wm * l).sum(), l

            _, out = jvp(grad(objective, has_aux=True), (primals,), (tangents,))
        if out is None:
            out = _double_backward_pass(run, primals, tangents, mb, wm)
        hv, c = out
        hv = run.fl.flat(hv)
        hv_total = hv if hv_total is None else hv_total + hv
        cs.append(c)
    return hv_total, torch.cat(cs)


def _double_backward_pass(run: Run, primals: Params, tangents: Params, mb: SeqBatch, wm: Tensor):
    """H v and c for one micro-batch by reverse-over-reverse of this step alone: the graph of
    one step's backward lives only inside this call, so memory stays flat in T."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in primals.items()}
    weights = wm.detach().requires_grad_(True)
    with torch.enable_grad():
        obj = (weights * run.losses(leaves, mb)).sum()
        g = grad_with_graph(obj, list(leaves.values()), run.first_graph_check())
        gv = sum((gi * tangents[k]).sum() for gi, k in zip(g, leaves))
        *hv, c = torch.autograd.grad(
            gv, [*leaves.values(), weights], allow_unused=True, materialize_grads=True
        )
    return dict(zip(leaves, hv)), c


def _rater_vjp(run: Run, batch: SeqBatch, w: Tensor, c: Tensor, meta: list[Tensor]):
    """meta += d/dphi of sum_i c_i w_i(phi), through the batch-wide softmax."""
    a_scores = w * (c - (w * c).sum()) / run.tau
    for mb, a in run.micro_batches(batch, a_scores):
        with torch.enable_grad():
            scores = check_scores(run.rater(mb.input_ids), mb.size)
            gs = torch.autograd.grad(
                scores, run.phi, a.to(scores.dtype), allow_unused=True, materialize_grads=True
            )
        for acc, gi in zip(meta, gs):
            acc.add_(gi)
