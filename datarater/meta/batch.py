"""Batches of token sequences, checked once, and the per-sequence language-model loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import select_backend
from ..kernels.cross_entropy import cross_entropy_per_token

KEYS = {"input_ids", "loss_mask"}


@dataclass(frozen=True)
class SeqBatch:
    """A validated batch: ids [B, L], next-token targets and per-token weights [B, L].

    Position j predicts ``input_ids[:, j + 1]``; the last position predicts nothing. A token's
    weight is ``mask / (number of masked targets in its row)`` so that summing a row's weighted
    token losses gives that sequence's mean next-token loss.
    """

    input_ids: Tensor
    targets: Tensor
    token_weights: Tensor
    max_id: int

    @classmethod
    def from_dict(cls, batch: Mapping[str, Tensor], name: str) -> SeqBatch:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"{name} must be a dict with an 'input_ids' tensor, got {type(batch)}")
        extra = sorted(set(batch) - KEYS)
        if extra:
            raise ValueError(
                f"{name} has key(s) {extra}; batches take 'input_ids' [B, L] and an optional "
                "'loss_mask' [B, L] only: models and raters are called with the ids alone and "
                "the targets are the ids shifted by one. Pad at the end of each row with "
                "loss_mask 0 there (under causal attention trailing padding changes no earlier "
                "token; the library's Rater masks its pad_id, a rater of your own sees the "
                "padding unless it masks it); left padding would need an attention mask, which "
                "is not passed on"
            )
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids)
            dtype = ids.dtype if isinstance(ids, Tensor) else ""
            raise ValueError(
                f"{name}['input_ids'] must be a LongTensor [B, L], got {shape} {dtype}"
            )
        b, n = ids.shape
        if b == 0:
            raise ValueError(f"{name} is empty (batch size 0)")
        if n < 2:
            raise ValueError(f"{name}: sequences need at least 2 tokens to have a target, got {n}")
        if int(ids.min()) < 0:
            raise ValueError(f"{name}['input_ids'] contains negative token ids")
        mask = batch.get("loss_mask")
        if mask is None:
            mask = torch.ones(b, n, device=ids.device, dtype=torch.float64)
        elif not isinstance(mask, Tensor) or mask.shape != ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)
            raise ValueError(
                f"{name}['loss_mask'] must have the shape of input_ids {(b, n)}, got {shape}"
            )
        mask = mask.to(device=ids.device, dtype=torch.float64)
        if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
            raise ValueError(
                f"{name}['loss_mask'] must be finite and >= 0 (a weight per target: each "
                "row's loss is the mask-weighted mean of its token losses)"
            )
        counts = mask[:, 1:].sum(dim=1)
        if bool((counts == 0).any()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"{name}['loss_mask'] masks every target of row(s) {rows[:8]}: the per-sequence "
                "mean loss is undefined there (loss_mask[:, j] selects input_ids[:, j] as a "
                "target, j >= 1)"
            )
        return cls.build(batch, int(ids.max()))

    @classmethod
    def build(cls, batch: Mapping[str, Tensor], max_id: int) -> SeqBatch:
        """The batch of a dict ``from_dict`` has already accepted (``max_id``: its largest id),
        without checking it again: the checks read values back from the device, and meta_step
        rebuilds every batch where it is used, in loops that should not wait for the GPU."""
        ids = batch["input_ids"]
        b = ids.shape[0]
        mask = batch.get("loss_mask")
        mask = (
            torch.ones(b, ids.shape[1], device=ids.device, dtype=torch.float64)
            if mask is None
            else mask.to(device=ids.device, dtype=torch.float64)
        )
        target_mask = torch.cat([mask[:, 1:], mask.new_zeros(b, 1)], dim=1)
        targets = torch.cat([ids[:, 1:], ids.new_zeros(b, 1)], dim=1)
        weights = target_mask / target_mask.sum(dim=1, keepdim=True)
        return cls(ids, targets, weights, max_id)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, dtype: torch.dtype) -> SeqBatch:
        return SeqBatch(self.input_ids, self.targets, self.token_weights.to(dtype), self.max_id)

    def split(self, micro_batch_size: int | None) -> list[SeqBatch]:
        if micro_batch_size is None or micro_batch_size >= self.size:
            return [self]
        return [
            SeqBatch(ids, t, w, self.max_id)
            for ids, t, w in zip(
                self.input_ids.split(micro_batch_size),
                self.targets.split(micro_batch_size),
                self.token_weights.split(micro_batch_size),
            )
        ]


def logits_of(output) -> Tensor:
    """Accept a logits tensor, a mapping with ``"logits"`` or an object with ``.logits``
    (Hugging Face outputs are both)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(
        "the model must return logits [B, L, V], a mapping with 'logits' or an object with "
        f".logits; it returned {type(output).__name__}"
    )


def sequence_losses(logits: Tensor, batch: SeqBatch, backend: str | None = None) -> Tensor:
    """Mean next-token cross-entropy of each sequence over its masked targets: [B].

    The loss layer runs on :mod:`datarater.kernels` (``backend=None``: the best available for
    these logits), differentiable in every mode meta_step needs.
    """
    b, n = batch.input_ids.shape
    if logits.dim() != 3 or logits.shape[:2] != (b, n):
        raise ValueError(
            f"the model must return logits [B, L, V] = [{b}, {n}, V], got {tuple(logits.shape)}"
        )
    v = logits.shape[-1]
    if batch.max_id >= v:
        raise ValueError(
            f"token id {batch.max_id} is out of range for the model's vocabulary of {v}"
        )
    flat = logits.reshape(b * n, v)
    per_token = cross_entropy_per_token(
        flat,
        batch.targets.reshape(-1),
        batch.token_weights.reshape(-1),
        -100,
        select_backend(flat, backend),
    )
    return per_token.view(b, n).sum(dim=1)
