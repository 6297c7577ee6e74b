"""The inner model's state as plain tensors, so it can be stepped functionally."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..optim import InnerOptimizer, Params, State


@dataclass
class InnerState:
    """Inner parameters, buffers, optimizer state and step count of one inner model.

    The module itself stays a stateless template: ``meta_step`` evaluates it with
    ``torch.func.functional_call(model, (state.params, state.buffers), ...)`` and returns a new
    ``InnerState`` after every call, so one module can serve a whole population of states.
    """

    params: Params
    buffers: dict[str, Tensor] = field(default_factory=dict)
    opt_state: State = field(default_factory=dict)
    step: int = 0

    @classmethod
    def init(cls, model: nn.Module, optimizer: InnerOptimizer) -> InnerState:
        """Copy a module's trainable parameters and buffers and start a fresh optimizer state."""
        params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("InnerState.init: the model has no trainable parameters")
        buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        return cls(params, buffers, optimizer.init(params), 0)

    def __call__(self, model: nn.Module, *args, **kwargs):
        """Run ``model`` with this state's tensors in place of its own."""
        return functional_call(model, (self.params, self.buffers), args, kwargs, strict=False)

    def detach(self) -> InnerState:
        return InnerState(
            {k: v.detach() for k, v in self.params.items()},
            {k: v.detach() for k, v in self.buffers.items()},
            {n: {k: v.detach() for k, v in d.items()} for n, d in self.opt_state.items()},
            self.step,
        )

    def clone(self) -> InnerState:
        return InnerState(
            {k: v.detach().clone() for k, v in self.params.items()},
            {k: v.detach().clone() for k, v in self.buffers.items()},
            {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.opt_state.items()},
            self.step,
        )

    def load_into(self, model: nn.Module) -> None:
        """Copy this state's parameters and buffers into ``model`` (for evaluation or export)."""
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        for k, v in (self.params | self.buffers).items():
            if k not in named or named[k].shape != v.shape:
                found = "no such tensor" if k not in named else f"shape {tuple(named[k].shape)}"
                raise ValueError(
                    f"load_into: the state's {k!r} {tuple(v.shape)} has no match in "
                    f"{type(model).__name__} ({found}): the state belongs to another model"
                )
        with torch.no_grad():
            for k, v in (self.params | self.buffers).items():
                named[k].copy_(v)

    def num_bytes(self) -> int:
        """Bytes held by parameters and optimizer state (what mixed mode keeps per step)."""
        tensors = list(self.params.values())
        tensors += [v for d in self.opt_state.values() for v in d.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
