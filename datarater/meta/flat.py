"""The inner parameters as one flat vector, and users' optimizers on per-parameter views of it.

The library's optimizers run once on the whole vector instead of once per tensor (their maths is
elementwise plus one global norm, so this is exact); other optimizers see per-parameter views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..optim import SGD, Adam, InnerOptimizer, Params, State


class Flat:
    """One flat vector for all inner parameters.

    The library's optimizers run once on the whole vector instead of once per tensor (their
    maths is elementwise plus one global norm, so this is exact); other optimizers see
    per-parameter views of it (``OnViews``); the model sees views of it.
    """

    KEY = "flat"

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.device = next(iter(params.values())).device
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise TypeError(
                f"inner parameters must share one dtype, got {sorted(map(str, dtypes))}"
            )

    def flat(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        if isinstance(tensors, Mapping):
            tensors = [tensors[k] for k in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def views(self, vec: Tensor) -> Params:
        parts = vec.split(self.numels)
        return {k: t.view(s) for k, t, s in zip(self.names, parts, self.shapes)}

    def flat_state(self, state: State) -> State:
        return {n: {self.KEY: self.flat(d)} for n, d in state.items()}

    def state_views(self, state: State) -> State:
        return {n: self.views(d[self.KEY]) for n, d in state.items()}

    def wrap(self, vec: Tensor) -> Params:
        return {self.KEY: vec}


class OnViews:
    """A user's optimizer (or a subclass that changed a library optimizer's update) on the flat
    vector: it gets and returns dicts of per-parameter views, named as the model names them,
    so per-tensor rules (a norm per tensor, decay for matrices only) hold, and its state stays
    as it keeps it (any shapes). Its own hooks (``update_vjp``, ``grads_for_vjp`` and the two
    properties) are used; without them autograd differentiates its update and each step's
    gradient is kept on the tape."""

    def __init__(self, opt: InnerOptimizer, fl: Flat) -> None:
        self.opt, self.fl = opt, fl
        self.linear_in_grads, self.recovers_grads = opt.linear_in_grads, opt.recovers_grads

    def _views(self, flat: Params) -> Params:
        return self.fl.views(flat[self.fl.KEY])

    def _flat(self, params: Params) -> Params:
        return self.fl.wrap(self.fl.flat(params))

    def clip(self, grads: Params):
        clipped, f, norm = self.opt.clip(self._views(grads))
        return self._flat(clipped), f, norm

    def update(self, params: Params, grads: Params, state: State, step: int):
        new, new_state = self.opt.update(self._views(params), self._views(grads), state, step)
        return self._flat(new), new_state

    def update_vjp(self, params, grads, state, step, a_params, a_state):
        views = self._views
        a_th, a_s, a_g = self.opt.update_vjp(
            views(params), views(grads), state, step, views(a_params), a_state
        )
        return self._flat(a_th), a_s, self._flat(a_g)

    def grads_for_vjp(self, state, new_state, grads_like, clip):
        g = self.opt.grads_for_vjp(state, new_state, self._views(grads_like), clip)
        return None if g is None else self._flat(g)


def state_in(opt, fl: Flat, state: State) -> State:
    """The optimizer state as the sweeps carry it: flat for the library's optimizers, a copy
    per parameter (the caller's stays untouched) for others."""
    if isinstance(opt, OnViews):
        return {n: {k: v.detach().clone() for k, v in d.items()} for n, d in state.items()}
    return fl.flat_state(state)


def state_out(opt, fl: Flat, s: State) -> State:
    return s if isinstance(opt, OnViews) else fl.state_views(s)


def on_flat(opt: InnerOptimizer, fl: Flat) -> InnerOptimizer | OnViews:
    """The optimizer as the sweeps call it: the library's own on the flat vector, any other
    on per-parameter views."""
    exact = any(isinstance(opt, kind) and opt._written_vjp_applies(kind) for kind in (SGD, Adam))
    return opt if exact else OnViews(opt, fl)
