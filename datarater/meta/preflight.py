"""The checks and refusals of ``meta_step`` and ``weighted_steps``, apart from the sweeps they
guard: arguments, states, batches against the models' declared limits, and what would make a
meta-gradient silently wrong (dropout and other random draws in a pass that mixed mode repeats,
batch statistics, activation checkpointing, once-differentiable ops, backward passes without a
graph). Also how PyTorch's errors about missing derivatives are reworded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from ..optim import InnerOptimizer
from .batch import SeqBatch
from .options import COMPUTE_DTYPES, HVP_PASSES, MODES, ON_NONFINITE, REMAT, Options
from .state import InnerState


def check_scores(scores, size: int) -> Tensor:
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


def check_common(model, state, optimizer, tau, micro_batch_size) -> None:
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


def refuse_batch_statistics(rater: nn.Module) -> None:
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


def refuse_dropout(**modules: nn.Module) -> None:
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
def refuse_randomness(role: str, watch: bool = True):
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


def grad_with_graph(obj: Tensor, inputs: list[Tensor], check: bool) -> tuple[Tensor, ...]:
    """``grad(obj, inputs, create_graph=True)``; with ``check`` (the first time in a call: the
    cost of the hooks is paid once), refuse a custom autograd
    Function whose backward is not itself differentiable (it calls kernels without
    derivatives, or detaches): its outputs would not carry the incoming gradient's graph, and
    the second-order terms through it would be dropped without a word. Seen by a hook on each
    custom Function's node while this backward runs."""
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


def declared_limits(module: nn.Module, max_id: int, length: int) -> list[str]:
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


def declared_vocab(model: nn.Module) -> int | None:
    """The vocabulary size a model declares in its config (ours, or Hugging Face style)."""
    for name in ("cfg", "config"):
        vocab = getattr(getattr(model, name, None), "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    return None


def attention_with_higher_derivatives():
    """PyTorch's fused attention kernels (flash, memory-efficient, cuDNN, the CPU flash kernel)
    have neither forward-mode AD nor a double backward, so a model calling
    ``F.scaled_dot_product_attention`` (Hugging Face's default) could not be meta-differentiated.
    Its math backend is made of plain ops that have both, at O(L^2) memory per head."""
    return sdpa_kernel([SDPBackend.MATH])


def missing_forward_derivative(text: str) -> bool:
    return (
        "forward AD" in text
        or "forward mode AD" in text
        or "override the setup_context staticmethod" in text
    )


def missing_derivative(e: BaseException) -> bool:
    """Is ``e`` PyTorch saying an op lacks a forward-mode or a second-order derivative?"""
    text = str(e)
    return (
        missing_forward_derivative(text)
        or ("derivative for" in text and "not implemented" in text)
        or "no autograd formula was registered" in text
    )


def with_autocast(o: Options, state: InnerState) -> Options:
    """A caller's ``torch.autocast`` region is taken as ``compute_dtype`` (meta_step then runs
    its own ops outside it: the region's policy is applied to the inner model's forward
    passes only)."""
    device = next(iter(state.params.values())).device.type
    if o.compute_dtype is not None or not torch.is_autocast_enabled(device):
        return o
    return replace(o, compute_dtype=torch.get_autocast_dtype(device))


@dataclass(frozen=True)
class Checked:
    """What the checks of a ``meta_step`` call found: the inner batches' largest ids (the
    batches are prepared again where they are used, so that their derived targets and weights
    are not held for all T steps at once), the outer batch, the rater's trained parameters and
    the largest id and length of all batches (for the error messages)."""

    inner: list
    inner_max_ids: list[int]
    outer: SeqBatch
    dtype: torch.dtype
    phi: list[Tensor]
    max_id: int
    length: int


def check_options(o: Options) -> None:
    if o.remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {o.remat!r}")
    if o.compute_dtype is not None and o.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be None (the parameters' dtype) or one of {COMPUTE_DTYPES}, "
            f"got {o.compute_dtype!r}"
            + (
                ": float16 needs loss scaling, which meta_step does not do"
                if o.compute_dtype == torch.float16
                else ""
            )  # fmt: skip
        )
    if o.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {o.mode!r}")
    if o.hvp not in HVP_PASSES:
        raise ValueError(f"hvp must be one of {HVP_PASSES}, got {o.hvp!r}")
    if o.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {o.on_nonfinite!r}")


def check_meta_step(rater, model, state, inner_batches, outer_batch, optimizer,
                    o: Options) -> Checked:  # fmt: skip
    """Every check of a ``meta_step`` call, before anything runs."""
    check_options(o)
    check_common(model, state, optimizer, o.tau, o.micro_batch_size)
    if isinstance(inner_batches, Mapping) or not isinstance(inner_batches, Sequence):
        raise TypeError("inner_batches must be a list of batches (one per inner step)")
    inner_batches = list(inner_batches)  # taken once: the batches checked are those used
    if not inner_batches:
        raise ValueError("inner_batches is empty: meta_step needs at least one inner step")
    if o.mode == "mixed":
        refuse_dropout(model=model, rater=rater)
    if o.mode == "mixed" or o.micro_batch_size is not None:
        refuse_batch_statistics(rater)
    dtype = _parameter_dtype(state)
    checked = [SeqBatch.from_dict(b, f"inner_batches[{t}]") for t, b in enumerate(inner_batches)]
    outer = SeqBatch.from_dict(outer_batch, "outer_batch").to(dtype)
    max_id = max(b.max_id for b in [*checked, outer])
    length = max(b.input_ids.shape[1] for b in [*checked, outer])
    phi = [p for p in rater.parameters() if p.requires_grad]
    if not phi:
        raise ValueError("the rater has no parameters that require grad")
    check_vocabularies(model, rater, max_id)
    ids = [b.max_id for b in checked]
    return Checked(inner_batches, ids, outer, dtype, phi, max_id, length)


def _parameter_dtype(state: InnerState) -> torch.dtype:
    dtype = next(iter(state.params.values())).dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the inner parameters are {dtype}: differentiating through T optimizer steps in "
            "half precision gives meta-gradients dominated by rounding (and Adam's eps "
            "underflows in float16); keep the inner model's parameters in float32 or float64"
        )
    return dtype


def check_vocabularies(model: nn.Module, rater: nn.Module, max_id: int) -> None:
    vocab = declared_vocab(model)
    if vocab is not None and max_id >= vocab:
        raise ValueError(f"token id {max_id} is out of range for the model's vocabulary of {vocab}")
    rater_vocab = declared_vocab(rater)
    if rater_vocab is not None and max_id >= rater_vocab:
        raise ValueError(
            f"token id {max_id} is out of range for the rater's vocabulary of {rater_vocab}: "
            "the rater reads the same ids as the model, so it needs the same tokenizer"
        )


@contextmanager
def reworded_errors(mode: str, model: nn.Module, rater: nn.Module, max_id: int, length: int):
    """PyTorch's errors from inside the sweeps, said in the caller's terms: an embedding lookup
    past a table, an op without the derivative this mode needs."""
    try:
        yield
    except IndexError as e:  # an embedding lookup past a table, in a model we cannot inspect
        limits = [
            f"the {role}'s {what}"
            for role, m in (("model", model), ("rater", rater))
            for what in declared_limits(m, max_id, length)
        ]
        raise ValueError(
            f"the model or rater raised IndexError ({e}); the batches hold token ids up to "
            f"{max_id} and sequences of {length} tokens"
            + (f", beyond {' and '.join(limits)}" if limits else "")
            + ": is an id out of a vocabulary, or a sequence longer than a position table?"
        ) from e
    except (NotImplementedError, RuntimeError) as e:
        if not missing_derivative(e):
            raise
        forward = missing_forward_derivative(str(e))  # (else a double backward)
        need = "forward-mode AD (a jvp)" if forward else "a differentiable backward"
        raise NotImplementedError(
            f"meta_step(mode={mode!r}) needs {need} of every op in the inner model, and one "
            f"op has none: {str(e).splitlines()[0]} PyTorch's scaled_dot_product_attention is "
            "already run on its math backend here; other fused kernels (flash-attn, xformers, "
            "fused losses or norms) must be switched off in the model, e.g. a Hugging Face "
            "model loaded with attn_implementation='eager' (or 'datarater': "
            "datarater.models.hf)"
            + (", or try hvp='double' or mode='reverse'" if forward else "")
            + "."
        ) from e
