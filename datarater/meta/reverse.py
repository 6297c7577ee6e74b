"""Reverse mode, the oracle: reverse-over-reverse through the unrolled steps
(``create_graph=True``). Its memory grows with T."""

from __future__ import annotations

import math

import torch

from ..optim import global_norm
from .batch import SeqBatch
from .context import Prepared, Run, on_host
from .flat import state_in, state_out
from .preflight import grad_with_graph
from .state import InnerState


def reverse(run: Run, state: InnerState, inner: Prepared, outer: SeqBatch):
    fl, opt = run.fl, run.opt
    theta = fl.flat(state.params).requires_grad_(True)
    s, step = state_in(opt, fl, state.opt_state), state.step
    losses, gnorms, weights = [], [], []
    with torch.enable_grad():
        for batch in inner:
            w = torch.softmax(run.scores(batch).to(theta.dtype) / run.tau, 0)
            views = fl.views(theta)
            g, loss = None, 0.0
            for mb, wm in run.micro_batches(batch, w):
                obj = (wm * run.losses(views, mb)).sum()
                gm = grad_with_graph(obj, [theta], run.first_graph_check())[0]
                g = gm if g is None else g + gm
                loss = obj.detach().double() + loss
            gnorms.append(global_norm(fl.wrap(g)).detach())
            new_theta, s = opt.update(fl.wrap(theta), fl.wrap(g), s, step + 1)
            theta, step = new_theta[fl.KEY], step + 1
            losses.append(loss)
            weights.append(w.detach())
        views = fl.views(theta)
        outer_obj = sum(run.losses(views, mb).sum() for mb in outer.split(run.micro))
        outer_obj = outer_obj / outer.size
        outer_loss = float(outer_obj.detach())
        if math.isfinite(outer_loss):
            meta = torch.autograd.grad(
                outer_obj, run.phi, allow_unused=True, materialize_grads=True
            )
        else:
            meta = [torch.zeros_like(p) for p in run.phi]
    theta = theta.detach()
    s = {n: {k: v.detach() for k, v in d.items()} for n, d in s.items()}
    final = InnerState(fl.views(theta), run.buffers, state_out(opt, fl, s), step)
    return final, outer_loss, on_host(losses), on_host(gnorms), weights, list(meta)
