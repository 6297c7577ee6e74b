"""``meta_step``: the gradient of a held-out loss with respect to a rater's parameters, taken
through T optimizer steps of an inner language model trained on rater-weighted batches.

Two modes compute the same number:

* ``mixed`` (default): one forward sweep keeps theta_t and s_t per step (never activations);
  one backward sweep pulls the adjoints back through each update with a VJP and through each
  inner gradient with ONE forward-over-reverse pass along a_g, which yields both the
  Hessian-vector product (added to a_theta) and each example's directional derivative
  c_i = grad l_i . a_g (pulled back through the softmax weights into the rater). Activations
  live for one micro-batch at a time, so memory is flat in T.
* ``reverse``: reverse-over-reverse through the unrolled steps (``create_graph=True``): the
  oracle. Its memory grows with T.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from ..optim import SGD, Adam, InnerOptimizer, Params, State, global_norm
from .batch import SeqBatch, logits_of, sequence_losses
from .state import InnerState

MODES = ("mixed", "reverse")
HVP_PASSES = ("auto", "func", "double")


class NonFiniteMetaGradient(FloatingPointError):
    """The outer loss or the meta-gradient is NaN or infinite."""


@dataclass
class MetaStepResult:
    """What one ``meta_step`` did. ``.grad`` of the rater holds the meta-gradient itself."""

    state: InnerState
    outer_loss: float
    inner_losses: list[float]
    weights: list[Tensor]
    meta_grad_norm: float
    skipped: bool = False
    reason: str | None = None
    inner_grad_norms: list[float] = field(default_factory=list)


@dataclass
class _Run:
    """Everything one meta_step call holds fixed."""

    rater: nn.Module
    model: nn.Module
    opt: InnerOptimizer | _OnViews
    tau: float
    micro: int | None
    hvp: str
    loss_backend: str | None
    phi: list[Tensor]
    buffers: dict[str, Tensor]
    fl: _Flat
    check_graph: bool = True  # the first backward with a graph is checked for cuts

    def scores(self, batch: SeqBatch) -> Tensor:
        return torch.cat(
            [_check_scores(self.rater(mb.input_ids), mb.size) for mb in batch.split(self.micro)]
        )

    def losses(self, params, batch: SeqBatch) -> Tensor:
        out = functional_call(self.model, (params, self.buffers), (batch.input_ids,), strict=False)
        return sequence_losses(logits_of(out), batch, backend=self.loss_backend)

    def micro_batches(self, batch: SeqBatch, w: Tensor):
        """Pairs (micro-batch, its slice of the batch-wide weights)."""
        start = 0
        for mb in batch.split(self.micro):
            yield mb, w[start : start + mb.size]
            start += mb.size


@dataclass
class _Tape:
    """What the forward sweep keeps of one inner step (no activations)."""

    params: Tensor  # theta_t, flat
    opt_state: State  # s_t, flat
    grads: Tensor | None  # g_t, kept only when the optimizer cannot rebuild it
    clip: Tensor | None
    weights: Tensor
    step: int


class _Prepared:
    """The inner batches as a sequence of SeqBatch, each built (checked once before) when it
    is used."""

    def __init__(
        self, batches: Sequence[Mapping[str, Tensor]], max_ids: list[int], dtype: torch.dtype
    ) -> None:
        self.batches, self.max_ids, self.dtype = batches, max_ids, dtype

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, t: int) -> SeqBatch:
        return SeqBatch.build(self.batches[t], self.max_ids[t]).to(self.dtype)

    def __iter__(self):
        return (self[t] for t in range(len(self)))


class _Flat:
    """One flat vector for all inner parameters.

    The library's optimizers run once on the whole vector instead of once per tensor (their
    maths is elementwise plus one global norm, so this is exact); other optimizers see
    per-parameter views of it (``_OnViews``); the model sees views of it.
    """

    KEY = "flat"

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
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


class _OnViews:
    """A user's optimizer (or a subclass that changed a library optimizer's update) on the flat
    vector: it gets and returns dicts of per-parameter views, named as the model names them,
    so per-tensor rules (a norm per tensor, decay for matrices only) hold, and its state stays
    as it keeps it (any shapes). Its own hooks (``update_vjp``, ``grads_for_vjp`` and the two
    properties) are used; without them autograd differentiates its update and each step's
    gradient is kept on the tape."""

    def __init__(self, opt: InnerOptimizer, fl: _Flat) -> None:
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


def _state_in(opt, fl: _Flat, state: State) -> State:
    """The optimizer state as the sweeps carry it: flat for the library's optimizers, a copy
    per parameter (the caller's stays untouched) for others."""
    if isinstance(opt, _OnViews):
        return {n: {k: v.detach().clone() for k, v in d.items()} for n, d in state.items()}
    return fl.flat_state(state)


def _state_out(opt, fl: _Flat, s: State) -> State:
    return s if isinstance(opt, _OnViews) else fl.state_views(s)


def _on_flat(opt: InnerOptimizer, fl: _Flat) -> InnerOptimizer | _OnViews:
    """The optimizer as the sweeps call it: the library's own on the flat vector, any other
    on per-parameter views."""
    exact = any(isinstance(opt, kind) and opt._written_vjp_applies(kind) for kind in (SGD, Adam))
    return opt if exact else _OnViews(opt, fl)


def _check_scores(scores, size: int) -> Tensor:
    if not isinstance(scores, Tensor) or scores.shape != (size,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores)
        raise ValueError(f"the rater must return scores of shape [B] = [{size}], got {shape}")
    return scores


def _check_state(state: InnerState, model: nn.Module, optimizer: InnerOptimizer) -> None:
    """The state must be the model's (same parameter names and shapes) and the optimizer's
    (same kind of state): else the error would come from deep inside, as a KeyError."""
    own = dict(model.named_parameters())
    fix = "build it with InnerState.init(model, optimizer)"
    for name, p in state.params.items():
        if name not in own:
            raise ValueError(
                f"state holds parameter {name!r}, which {type(model).__name__} does not have: "
                f"the state is another model's; {fix}"
            )
        if own[name].shape != p.shape:
            raise ValueError(
                f"state parameter {name!r} has shape {tuple(p.shape)}, the model's has "
                f"{tuple(own[name].shape)}: the state is another model's; {fix}"
            )
    try:
        wanted = set(optimizer.init({}))  # the kinds of state this optimizer keeps
    except Exception:  # noqa: BLE001 - a user's optimizer may need parameters to say
        return
    if set(state.opt_state) != wanted:
        raise ValueError(
            f"state holds optimizer state {sorted(state.opt_state)}, but "
            f"{type(optimizer).__name__} keeps {sorted(wanted)}: the state was built for "
            f"another optimizer (or momentum setting); {fix}"
        )


def _check_common(model, state, optimizer, tau, micro_batch_size) -> None:
    """The checks meta_step and weighted_steps share."""
    if isinstance(tau, bool) or not (
        isinstance(tau, numbers.Real) and tau > 0 and math.isfinite(tau)
    ):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if micro_batch_size is not None and (
        isinstance(micro_batch_size, bool)
        or not isinstance(micro_batch_size, int)
        or micro_batch_size < 1
    ):
        raise ValueError(
            f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}"
        )
    if not isinstance(state, InnerState):
        raise TypeError(
            f"state must be an InnerState (InnerState.init(model, optimizer)), got {type(state)}"
        )
    if not isinstance(optimizer, InnerOptimizer):
        raise TypeError(f"optimizer must be a datarater.optim optimizer, got {type(optimizer)}")
    _check_state(state, model, optimizer)
    _refuse_checkpointing(model)


def _refuse_batch_statistics(rater: nn.Module) -> None:
    """Mixed mode and micro-batches score a batch in pieces and more than once; a rater whose
    scores depend on which rows share its batch (BatchNorm in training mode, which also
    updates its running statistics at each pass) would give a wrong meta-gradient silently."""
    found = [
        name or type(rater).__name__
        for name, m in rater.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if found:
        raise ValueError(
            "the rater has BatchNorm in training mode "
            f"({', '.join(found[:6])}): its scores would depend on how meta_step splits and "
            "repeats its batches (mode='mixed', micro_batch_size); call .eval() on the rater "
            "or use mode='reverse' without micro_batch_size"
        )


_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _refuse_dropout(**modules: nn.Module) -> None:
    """Mixed mode runs each forward pass twice (the step, then its recomputation in the
    backward sweep), so a layer that draws random masks would see two different networks and
    the meta-gradient would be wrong without any sign of it. Dropout layers in training mode
    are refused by name; other randomness inside a model's code cannot be seen from here."""
    found = [
        f"{role}.{name} (p={m.p})"
        for role, module in modules.items()
        for name, m in module.named_modules()
        if isinstance(m, _DROPOUT) and m.training and m.p > 0
    ]
    if found:
        raise ValueError(
            "mode='mixed' recomputes every inner step's forward pass, and dropout would draw "
            "other masks there than in the step itself: the meta-gradient would be silently "
            "wrong. Call .eval() on the model and the rater (or set their dropout to 0), or "
            f"use mode='reverse'. Dropout in training mode: {', '.join(found[:6])}"
            + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        )


class _RandomOps(TorchDispatchMode):
    """Notes every random op (PyTorch tags them ``nondeterministic_seeded``: dropout's
    bernoulli, rand, randn, ...) dispatched by this thread while it is active; other threads
    and private generators make no difference to what it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seeded = _SEEDED.get(func)
        if seeded is None:
            seeded = _SEEDED[func] = torch.Tag.nondeterministic_seeded in func.tags
        if seeded and not _draws_nothing(func, args, kwargs):
            self.seen.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


_SEEDED: dict = {}  # op -> is it tagged random (a lookup per op is what the watch costs)


def _draws_nothing(func, args, kwargs) -> bool:
    """Ops tagged random because they can draw (fused attention's and dropout's probability,
    RReLU's training flag) draw nothing that matters with a probability of 0 or outside
    training."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name in ("dropout_p", "p", "train", "training"):
            value = kwargs.get(arg.name, args[i] if i < len(args) else arg.default_value)
            zero = isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
            if value is False or (arg.name in ("dropout_p", "p") and zero):
                return True
    return False


@contextmanager
def _refuse_randomness(role: str, watch: bool = True):
    """Mixed mode recomputes every forward pass: one that draws random numbers (functional
    dropout, ``scaled_dot_product_attention(dropout_p=...)``, Hugging Face's
    ``attention_dropout``) would see other draws there, and the meta-gradient would be silently
    wrong. The passes run inside (with ``watch``) are watched; one with a random op is
    refused."""
    if not watch:
        yield
        return
    with _RandomOps() as ops:
        yield
    if ops.seen:
        raise ValueError(
            f"mode='mixed' recomputes every inner step's forward pass, and the {role}'s forward "
            f"pass draws random numbers ({', '.join(sorted(set(ops.seen)))}: dropout through "
            "F.dropout or scaled_dot_product_attention(dropout_p=...), e.g. a Hugging Face "
            "model's attention_dropout in training mode?): the recomputation would see other "
            f"draws and the meta-gradient would be silently wrong. Call .eval() on the {role}, "
            "set its dropout to 0, or use mode='reverse'"
        )


def _refuse_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing recomputes forward passes during the backward pass, after
    ``functional_call`` has put the module's own weights back: the gradients would be those
    of other weights. Hugging Face's switch is refused on modules in training mode (the only
    ones it checkpoints); plain ``torch.utils.checkpoint`` calls
    inside a model's code cannot be seen from here."""
    if any(
        getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules()
    ):
        raise ValueError(
            "the model has gradient checkpointing on: its recomputation in the backward pass "
            "would read the module's own weights instead of the inner state's, and the "
            "gradients would be silently wrong. Switch it off "
            "(model.gradient_checkpointing_disable()); micro_batch_size bounds the activation "
            "memory instead"
        )


def _graph_nodes(*roots: Tensor):
    """Every autograd node behind ``roots``, once each."""
    seen, stack = set(), [t.grad_fn for t in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions)


def _refuse_cut_graph(*grads: Tensor) -> None:
    """A once-differentiable op (``@once_differentiable``, the pattern of many fused kernels)
    leaves an error node in the gradient's graph, and autograd then drops its second-order
    terms without a word: the meta-gradient of reverse mode or of the double-backward pass
    would be silently wrong."""
    for node in _graph_nodes(*grads):
        if type(node).__name__ in ("Error", "DelayedError"):
            raise NotImplementedError(
                "meta_step needs a differentiable backward of every op in the "
                "inner model, and one op is marked once-differentiable (@once_differentiable, "
                "as many fused kernels are): its second-order terms would be silently dropped. "
                "Switch such kernels off in the model (e.g. a Hugging Face model loaded with "
                "attn_implementation='eager', no fused losses or norms)"
            )


def _grad_with_graph(obj: Tensor, inputs: list[Tensor], run: _Run) -> tuple[Tensor, ...]:
    """``grad(obj, inputs, create_graph=True)``; the first time in a call (``run.check_graph``:
    the cost of the hooks is paid once), refuse a custom autograd
    Function whose backward is not itself differentiable (it calls kernels without
    derivatives, or detaches): its outputs would not carry the incoming gradient's graph, and
    the second-order terms through it would be dropped without a word. Seen by a hook on each
    custom Function's node while this backward runs."""
    check, run.check_graph = run.check_graph, False
    cut: list[str] = []

    def hook(node, grad_inputs, grad_outputs):
        if not any(g is not None and g.requires_grad for g in grad_outputs):
            return
        for g, (edge, _) in zip(grad_inputs, node.next_functions):
            # (no edge: an input that needs no gradient; all zeros: a derivative that is 0)
            if edge is not None and g is not None and not g.requires_grad and bool(g.any()):
                cut.append(type(node).__name__.removesuffix("Backward"))
                return

    custom = torch.autograd.function.BackwardCFunction
    handles = [
        node.register_hook(lambda gi, go, node=node: hook(node, gi, go))
        for node in (_graph_nodes(obj) if check else ())
        if isinstance(node, custom)
    ]
    try:
        grads = torch.autograd.grad(
            obj, inputs, create_graph=True, allow_unused=True, materialize_grads=True
        )
    finally:
        for h in handles:
            h.remove()
    if cut:
        raise NotImplementedError(
            "meta_step needs a differentiable backward of every op in the inner model, and "
            f"the backward of the custom autograd Function(s) {sorted(set(cut))} is not (it "
            "returns gradients without a graph: kernels without derivatives, or a detach): "
            "the second-order terms through it would be silently dropped. Switch such kernels "
            "off in the model (e.g. a Hugging Face model loaded with "
            "attn_implementation='eager', no fused losses or norms), or give the Function a "
            "jvp and use mode='mixed', hvp='func'"
        )
    if check:
        _refuse_cut_graph(*grads)
    return grads


def _declared_limits(module: nn.Module, max_id: int, length: int) -> list[str]:
    """What a module's config declares that the batches exceed (vocabulary, positions)."""
    found = []
    for name in ("cfg", "config"):
        cfg = getattr(module, name, None)
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and max_id >= vocab:
            found.append(f"vocabulary of {vocab}")
        for key in ("max_seq_len", "n_positions", "max_position_embeddings"):
            limit = getattr(cfg, key, None)
            if isinstance(limit, int) and length > limit:
                found.append(f"{key} of {limit}")
                break  # (Hugging Face configs alias these names)
    return found


def _attention_with_higher_derivatives():
    """PyTorch's fused attention kernels (flash, memory-efficient, cuDNN, the CPU flash kernel)
    have neither forward-mode AD nor a double backward, so a model calling
    ``F.scaled_dot_product_attention`` (Hugging Face's default) could not be meta-differentiated.
    Its math backend is made of plain ops that have both, at O(L^2) memory per head."""
    return sdpa_kernel([SDPBackend.MATH])


def _missing_forward_derivative(text: str) -> bool:
    return (
        "forward AD" in text
        or "forward mode AD" in text
        or "override the setup_context staticmethod" in text
    )


def _missing_derivative(e: BaseException) -> bool:
    """Is ``e`` PyTorch saying an op lacks a forward-mode or a second-order derivative?"""
    text = str(e)
    return (
        _missing_forward_derivative(text)
        or ("derivative for" in text and "not implemented" in text)
        or "no autograd formula was registered" in text
    )


def _own_buffers(state: InnerState) -> dict[str, Tensor]:
    """Copies of the state's buffers: a model that updates buffers in its forward pass
    (running statistics) must not change the caller's state, which stays what it was."""
    return {k: v.clone() for k, v in state.buffers.items()}


def _declared_vocab(model: nn.Module) -> int | None:
    """The vocabulary size a model declares in its config (ours, or Hugging Face style)."""
    for name in ("cfg", "config"):
        vocab = getattr(getattr(model, name, None), "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    return None


def _on_host(scalars: list[Tensor]) -> list[float]:
    """0-dim tensors (on one device or several) as Python floats, in one read per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(scalars):
        by_device.setdefault(x.device, []).append(i)
    out = [0.0] * len(scalars)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([scalars[i].double() for i in idx]).tolist()):
            out[i] = v
    return out


def _all_finite(tensors) -> bool:
    return all(v == 1.0 for v in _on_host([torch.isfinite(t).all() for t in tensors]))


def _norm(tensors) -> float:
    return math.sqrt(sum(_on_host([t.double().pow(2).sum() for t in tensors])))


# ----------------------------------------------------------------------------------------------
# public entry point


def meta_step(
    rater: nn.Module,
    model: nn.Module,
    state: InnerState,
    inner_batches: Sequence[Mapping[str, Tensor]],
    outer_batch: Mapping[str, Tensor],
    *,
    optimizer: InnerOptimizer,
    mode: str = "mixed",
    tau: float = 1.0,
    micro_batch_size: int | None = None,
    on_nonfinite: str = "raise",
    hvp: str = "auto",
    loss_backend: str | None = None,
) -> MetaStepResult:
    """Accumulate d(outer loss)/d(rater parameters) into the rater's ``.grad``.

    For each of the T = ``len(inner_batches)`` batches: weights = softmax(rater scores / tau)
    over the batch, inner gradient of sum_i w_i * loss_i, one ``optimizer`` update of ``state``.
    The outer loss is the mean per-sequence loss on ``outer_batch`` at the final parameters.
    ``micro_batch_size`` splits every batch into chunks of at most that many rows; the
    batch-wide softmax weights stay exact, and so does the result (for raters whose scores do
    not depend on the rows beside them: BatchNorm in training mode is refused). ``hvp``
    (mixed mode): ``"auto"`` uses the model's hand-written forward-over-reverse pass when it
    has one (the library's ``CausalLM`` does), else ``"double"`` (one step's
    reverse-over-reverse); ``"func"`` uses ``torch.func.jvp`` of ``torch.func.grad``.
    ``loss_backend`` picks the cross-entropy kernel backend of the loss layer (default: the
    best available).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if hvp not in HVP_PASSES:
        raise ValueError(f"hvp must be one of {HVP_PASSES}, got {hvp!r}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    _check_common(model, state, optimizer, tau, micro_batch_size)
    if isinstance(inner_batches, Mapping) or not isinstance(inner_batches, Sequence):
        raise TypeError("inner_batches must be a list of batches (one per inner step)")
    inner_batches = list(inner_batches)  # taken once: the batches checked are those used
    if not inner_batches:
        raise ValueError("inner_batches is empty: meta_step needs at least one inner step")
    if mode == "mixed":
        _refuse_dropout(model=model, rater=rater)
    if mode == "mixed" or micro_batch_size is not None:
        _refuse_batch_statistics(rater)
    dtype = next(iter(state.params.values())).dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the inner parameters are {dtype}: differentiating through T optimizer steps in "
            "half precision gives meta-gradients dominated by rounding (and Adam's eps "
            "underflows in float16); keep the inner model's parameters in float32 or float64"
        )
    # Batches are checked now and prepared again where they are used, so that their derived
    # targets and weights are not held for all T steps at once.
    checked = [SeqBatch.from_dict(b, f"inner_batches[{t}]") for t, b in enumerate(inner_batches)]
    outer = SeqBatch.from_dict(outer_batch, "outer_batch").to(dtype)
    max_id = max(b.max_id for b in [*checked, outer])
    length = max(b.input_ids.shape[1] for b in [*checked, outer])
    inner = _Prepared(inner_batches, [b.max_id for b in checked], dtype)
    del checked
    phi = [p for p in rater.parameters() if p.requires_grad]
    if not phi:
        raise ValueError("the rater has no parameters that require grad")

    vocab = _declared_vocab(model)
    if vocab is not None and max_id >= vocab:
        raise ValueError(f"token id {max_id} is out of range for the model's vocabulary of {vocab}")
    rater_vocab = _declared_vocab(rater)
    if rater_vocab is not None and max_id >= rater_vocab:
        raise ValueError(
            f"token id {max_id} is out of range for the rater's vocabulary of {rater_vocab}: "
            "the rater reads the same ids as the model, so it needs the same tokenizer"
        )

    fl = _Flat(state.params)
    run = _Run(
        rater,
        model,
        _on_flat(optimizer, fl),
        float(tau),
        micro_batch_size,
        hvp,
        loss_backend,
        phi,
        _own_buffers(state),
        fl,
    )
    sweep = _mixed if mode == "mixed" else _reverse
    try:
        with _attention_with_higher_derivatives():
            new_state, outer_loss, inner_losses, gnorms, weights, meta = sweep(
                run, state, inner, outer
            )
    except IndexError as e:  # an embedding lookup past a table, in a model we cannot inspect
        limits = [
            f"the {role}'s {what}"
            for role, m in (("model", model), ("rater", rater))
            for what in _declared_limits(m, max_id, length)
        ]
        raise ValueError(
            f"the model or rater raised IndexError ({e}); the batches hold token ids up to "
            f"{max_id} and sequences of {length} tokens"
            + (f", beyond {' and '.join(limits)}" if limits else "")
            + ": is an id out of a vocabulary, or a sequence longer than a position table?"
        ) from e
    except (NotImplementedError, RuntimeError) as e:
        if not _missing_derivative(e):
            raise
        forward = _missing_forward_derivative(str(e))  # (else a double backward)
        need = "forward-mode AD (a jvp)" if forward else "a differentiable backward"
        raise NotImplementedError(
            f"meta_step(mode={mode!r}) needs {need} of every op in the inner model, and one "
            f"op has none: {str(e).splitlines()[0]} PyTorch's scaled_dot_product_attention is "
            "already run on its math backend here; other fused kernels (flash-attn, xformers, "
            "fused losses or norms) must be switched off in the model, e.g. a Hugging Face "
            "model loaded with attn_implementation='eager'"
            + (", or try hvp='double' or mode='reverse'" if forward else "")
            + "."
        ) from e

    reason = None
    bad_step = next((t for t, x in enumerate(inner_losses) if not math.isfinite(x)), None)
    if bad_step is not None:
        reason = f"the inner loss of step {bad_step} is {inner_losses[bad_step]}"
    elif not math.isfinite(outer_loss):
        reason = f"outer loss is {outer_loss}"
    elif not _all_finite(meta):
        reason = "meta-gradient has NaN or inf entries"
    norm = _norm(meta) if reason is None else float("nan")
    if reason is not None:
        if on_nonfinite == "raise":
            raise NonFiniteMetaGradient(f"meta_step: {reason} (pass on_nonfinite='skip' to skip)")
        if not _all_finite(new_state.params.values()):
            new_state = state
        return MetaStepResult(
            new_state, outer_loss, inner_losses, weights, norm, True, reason, gnorms
        )

    for p, g in zip(phi, meta):
        p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
    return MetaStepResult(new_state, outer_loss, inner_losses, weights, norm, False, None, gnorms)


# ----------------------------------------------------------------------------------------------
# mixed mode


def _inner_grad(run: _Run, theta: Tensor, batch: SeqBatch, w: Tensor, watch: bool = False):
    """Flat gradient of sum_i w_i l_i at theta, summed over micro-batches; and its value (a
    float64 tensor on theta's device: read back once per call, not once per step).
    ``watch``: refuse a first forward pass that runs random ops (``_refuse_randomness``)."""
    total, loss = None, 0.0
    for mb, wm in run.micro_batches(batch, w):
        leaves = {k: v.detach().requires_grad_(True) for k, v in run.fl.views(theta).items()}
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            with _refuse_randomness("model", watch):
                obj = (wm * run.losses(leaves, mb)).sum()
            g = torch.autograd.grad(
                obj, list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        watch = False
        g = run.fl.flat(g)
        total = g if total is None else total + g
        loss = obj.detach().double() + loss
    return total, loss


def _mixed(run: _Run, state: InnerState, inner: _Prepared, outer: SeqBatch):
    fl, opt = run.fl, run.opt
    theta, s = fl.flat(state.params), _state_in(opt, fl, state.opt_state)
    step, dtype = state.step, theta.dtype
    keep_grads = not (opt.linear_in_grads or opt.recovers_grads)
    tape: list[_Tape] = []
    losses, gnorms, weights = [], [], []
    for t, batch in enumerate(inner):
        with torch.no_grad(), _refuse_randomness("rater", t == 0):
            w = torch.softmax(run.scores(batch).to(dtype) / run.tau, 0)
        g, loss = _inner_grad(run, theta, batch, w, watch=t == 0)
        with torch.no_grad():  # the clip factor helps rebuild g_t later
            clipped, f, gnorm = opt.clip(fl.wrap(g))
            if isinstance(opt, _OnViews):  # its own update, which need not be clip, then step
                new_theta, new_s = opt.update(fl.wrap(theta), fl.wrap(g), s, step + 1)
            else:
                new_theta, new_s = opt.step(fl.wrap(theta), clipped, s, step + 1)
        tape.append(_Tape(theta, s, g if keep_grads else None, f, w, step + 1))
        theta, s, step = new_theta[fl.KEY], new_s, step + 1
        losses.append(loss)
        gnorms.append(gnorm)
        weights.append(w)
    losses, gnorms = _on_host(losses), _on_host(gnorms)

    # The outer loss and its gradient at theta_T start the backward sweep.
    mean = torch.full((outer.size,), 1.0 / outer.size, dtype=dtype, device=theta.device)
    a_theta, outer_loss = _inner_grad(run, theta, outer, mean)
    outer_loss = float(outer_loss)
    final = InnerState(fl.views(theta), run.buffers, _state_out(opt, fl, s), step)
    meta = [torch.zeros_like(p) for p in run.phi]
    if not math.isfinite(outer_loss):
        return final, outer_loss, losses, gnorms, weights, meta

    a_s = {n: {k: torch.zeros_like(v) for k, v in d.items()} for n, d in s.items()}
    s_next = s
    for t in reversed(range(len(inner))):
        rec = tape.pop()  # each step's record is dropped once it has been used
        a_theta, a_s = _sweep_step(run, rec, s_next, inner[t], a_theta, a_s, meta)
        s_next = rec.opt_state
    return final, outer_loss, losses, gnorms, weights, meta


def _sweep_step(run: _Run, rec: _Tape, s_next: State, batch: SeqBatch, a_theta, a_s, meta):
    """Pull the adjoints back through one inner step; add its part of the meta-gradient.

    A function of its own so that its temporaries (g_t, a_g, H v) are freed on return, before
    the next step's forward-over-reverse pass allocates its activations.
    """
    fl = run.fl
    g = rec.grads
    if g is None:
        g = run.opt.grads_for_vjp(rec.opt_state, s_next, fl.wrap(rec.params), rec.clip)[fl.KEY]
    a_theta, a_s, a_g = _update_vjp(run.opt, rec, g, a_theta, a_s)
    del g
    hv, c = _hvp_and_tangents(run, rec.params, batch, rec.weights, a_g)
    _rater_vjp(run, batch, rec.weights, c, meta)
    return a_theta.add_(hv), a_s


def _update_vjp(opt: InnerOptimizer, rec: _Tape, g: Tensor, a_theta: Tensor, a_s: State):
    """Pull (a_theta, a_s) back through U(theta_t, s_t, g_t): elementwise, so cheap."""
    key = _Flat.KEY
    a_th, a_s, a_g = opt.update_vjp(
        {key: rec.params}, {key: g}, rec.opt_state, rec.step, {key: a_theta}, a_s
    )
    return a_th[key], a_s, a_g[key]


def _hvp_and_tangents(run: _Run, theta: Tensor, batch: SeqBatch, w: Tensor, v: Tensor):
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
            out = own(
                primals,
                tangents,
                mb.input_ids,
                mb.targets,
                mb.token_weights,
                wm,
                loss_backend=run.loss_backend,
            )
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


def _double_backward_pass(run: _Run, primals: Params, tangents: Params, mb: SeqBatch, wm: Tensor):
    """H v and c for one micro-batch by reverse-over-reverse of this step alone: the graph of
    one step's backward lives only inside this call, so memory stays flat in T."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in primals.items()}
    weights = wm.detach().requires_grad_(True)
    with torch.enable_grad():
        obj = (weights * run.losses(leaves, mb)).sum()
        g = _grad_with_graph(obj, list(leaves.values()), run)
        gv = sum((gi * tangents[k]).sum() for gi, k in zip(g, leaves))
        *hv, c = torch.autograd.grad(
            gv, [*leaves.values(), weights], allow_unused=True, materialize_grads=True
        )
    return dict(zip(leaves, hv)), c


def _rater_vjp(run: _Run, batch: SeqBatch, w: Tensor, c: Tensor, meta: list[Tensor]):
    """meta += d/dphi of sum_i c_i w_i(phi), through the batch-wide softmax."""
    a_scores = w * (c - (w * c).sum()) / run.tau
    for mb, a in run.micro_batches(batch, a_scores):
        with torch.enable_grad():
            scores = _check_scores(run.rater(mb.input_ids), mb.size)
            gs = torch.autograd.grad(
                scores, run.phi, a.to(scores.dtype), allow_unused=True, materialize_grads=True
            )
        for acc, gi in zip(meta, gs):
            acc.add_(gi)


# ----------------------------------------------------------------------------------------------
# reverse mode (the oracle)


def _reverse(run: _Run, state: InnerState, inner: _Prepared, outer: SeqBatch):
    fl, opt = run.fl, run.opt
    theta = fl.flat(state.params).requires_grad_(True)
    s, step = _state_in(opt, fl, state.opt_state), state.step
    losses, gnorms, weights = [], [], []
    with torch.enable_grad():
        for batch in inner:
            w = torch.softmax(run.scores(batch).to(theta.dtype) / run.tau, 0)
            views = fl.views(theta)
            g, loss = None, 0.0
            for mb, wm in run.micro_batches(batch, w):
                obj = (wm * run.losses(views, mb)).sum()
                gm = _grad_with_graph(obj, [theta], run)[0]
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
    final = InnerState(fl.views(theta), run.buffers, _state_out(opt, fl, s), step)
    return final, outer_loss, _on_host(losses), _on_host(gnorms), weights, list(meta)


def weighted_steps(
    rater: nn.Module,
    model: nn.Module,
    state: InnerState,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    optimizer: InnerOptimizer,
    tau: float = 1.0,
    micro_batch_size: int | None = None,
) -> InnerState:
    """Plain inner training on rater-weighted batches, no meta-gradient: what inner models do
    between meta-updates. Same weighting and update as ``meta_step``'s forward sweep, and the
    same checks of its arguments."""
    _check_common(model, state, optimizer, tau, micro_batch_size)
    if isinstance(batches, Mapping):  # any iterable of batches (a loader), but not one batch
        raise TypeError("batches must be an iterable of batches (one per step), not one batch")
    if micro_batch_size is not None:
        _refuse_batch_statistics(rater)
    fl, buffers = _Flat(state.params), _own_buffers(state)
    opt = _on_flat(optimizer, fl)
    theta, s, step = fl.flat(state.params), _state_in(opt, fl, state.opt_state), state.step
    run = _Run(rater, model, opt, float(tau), micro_batch_size, "auto", None, [], buffers, fl)
    vocab = _declared_vocab(model)
    for t, raw in enumerate(batches):
        batch = SeqBatch.from_dict(raw, f"batches[{t}]").to(theta.dtype)
        if vocab is not None and batch.max_id >= vocab:
            raise ValueError(
                f"batches[{t}]: token id {batch.max_id} is out of range for the model's "
                f"vocabulary of {vocab}"
            )
        with torch.no_grad():
            w = torch.softmax(run.scores(batch).to(theta.dtype) / run.tau, 0)
        g, _ = _inner_grad(run, theta, batch, w)
        with torch.no_grad():
            new, s = opt.update(fl.wrap(theta), fl.wrap(g), s, step + 1)
        theta, step = new[fl.KEY], step + 1
    return InnerState(fl.views(theta), buffers, _state_out(opt, fl, s), step)
