"""Small transformers: a causal language model (the inner model) and a non-causal rater.

Everything in the forward pass can be differentiated in forward mode and twice in reverse
mode, so both models work under ``torch.func.jvp`` of ``torch.func.grad`` (mixed-mode
meta-gradients) and under ``create_graph=True`` (the reverse-over-reverse oracle). PyTorch's
fused SDPA kernels have neither, so attention runs :func:`datarater.kernels.attention`
(flash-style in every pass, memory linear in the length; ``attention="fused"``, the default)
or is written out with L x L scores (``attention="written"``: what the tests compare with).
Pure inference (scoring) runs PyTorch's fused attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.attention import attention, inference_attention

ATTENTION_KINDS = ("fused", "written")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a transformer; the same config describes an inner LM or a rater."""

    vocab_size: int = 256
    max_seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    tie_embeddings: bool = False
    attention: str = "fused"  # or "written": L x L scores, the reference

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"TransformerConfig.attention must be one of {ATTENTION_KINDS}, got "
                f"{self.attention!r}"
            )
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self, with_lm_head: bool = True) -> int:
        """Parameter count without building the model (for sizing presets)."""
        d, h = self.d_model, self.d_model * self.mlp_ratio
        block = 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d
        n = self.vocab_size * d + self.max_seq_len * d + self.n_layers * block + 2 * d
        if with_lm_head and not self.tie_embeddings:
            n += self.vocab_size * d
        return n


# Presets from a CPU toy up to hundreds of millions of parameters. The "17m" preset is the
# design card's benchmark model; "435m" is its scale anchor.
PRESETS: dict[str, TransformerConfig] = {
    "toy": TransformerConfig(vocab_size=256, max_seq_len=128, d_model=32, n_layers=2, n_heads=2),
    "tiny": TransformerConfig(vocab_size=256, max_seq_len=256, d_model=64, n_layers=2, n_heads=2),
    "small": TransformerConfig(
        vocab_size=8192, max_seq_len=512, d_model=256, n_layers=4, n_heads=4
    ),
    "17m": TransformerConfig(
        vocab_size=8192, max_seq_len=256, d_model=512, n_layers=4, n_heads=8, tie_embeddings=True
    ),
    "50m": TransformerConfig(
        vocab_size=32768, max_seq_len=2048, d_model=512, n_layers=8, n_heads=8
    ),
    # the design card's scoring anchor: ~50M parameters in the blocks, ~70M with embeddings;
    # 128-wide heads: flash attention runs them 8 % faster than 64-wide ones at the same
    # parameters and FLOPs (bench/RESULTS.md, H200)
    "rater-70m": TransformerConfig(
        vocab_size=32768, max_seq_len=2048, d_model=640, n_layers=10, n_heads=5
    ),
    "125m": TransformerConfig(
        vocab_size=32768, max_seq_len=2048, d_model=768, n_layers=12, n_heads=12
    ),
    "435m": TransformerConfig(
        vocab_size=32768,
        max_seq_len=2048,
        d_model=1280,
        n_layers=20,
        n_heads=20,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named size, optionally with fields overridden (``preset("tiny", vocab_size=512)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name].to_dict(), **overrides})


class Attention(nn.Module):
    """Multi-head self-attention with every derivative a meta-gradient needs."""

    def __init__(self, cfg: TransformerConfig, causal: bool) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.causal = causal
        self.kind = cfg.attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        # Set on copies that only ever run inference (scoring): fused attention without asking
        # torch.is_inference_mode_enabled(), which torch.compile cannot trace (a graph break
        # in every layer).
        self.inference_only = False
        # On the fused path: "sdpa" (PyTorch) or "triton" (datarater.kernels.attention).
        self.attention_backend = "sdpa"

    def forward(self, x: Tensor, key_padding: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        fused = self.inference_only or torch.is_inference_mode_enabled()
        if fused and not (self.causal and key_padding is not None):
            # Pure inference (scoring, evaluation) needs no derivatives, so PyTorch's fused
            # attention may run: flash attention on GPUs when there is no mask.
            if self.attention_backend == "triton":  # [b, n, h, dh]: no transpose copy
                keep = None if key_padding is None else ~key_padding
                out = inference_attention(q, k, v, keep=keep, causal=self.causal, backend="triton")
                return self.proj(out.reshape(b, n, d))
            mask = None if key_padding is None else ~key_padding[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
            return self.proj(out.transpose(1, 2).reshape(b, n, d))
        if self.kind == "fused":
            return self.proj(self._fused(q, k, v, key_padding).reshape(b, n, d))
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // h))
        if self.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def _fused(self, q, k, v, key_padding) -> Tensor:
        """datarater's attention kernel: ``[b, n, h, dh]``, no transpose copy."""
        keep = None if key_padding is None else ~key_padding
        return attention(q, k, v, keep=keep, causal=self.causal)


ATTENTION_BACKENDS = ("sdpa", "triton")  # what set_inference_attention takes


def set_inference_attention(model: nn.Module, backend: str = "sdpa") -> nn.Module:
    """Mark ``model``'s attention layers as inference-only (fused attention, and no query of
    the inference mode, which torch.compile cannot trace) running ``backend``: "sdpa"
    (PyTorch) or "triton" (:mod:`datarater.kernels.attention`). For copies that never train,
    as scoring makes them; returns the model."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.inference_only = True
            m.attention_backend = backend
    return model


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: TransformerConfig, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, causal)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, key_padding: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), key_padding)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _Trunk(nn.Module):
    def __init__(self, cfg: TransformerConfig, causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(_init_weights)
        # Scale the residual projections so that deep models start near the identity.
        for blk in self.blocks:
            for lin in (blk.attn.proj, blk.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def hidden(self, input_ids: Tensor, key_padding: Tensor | None = None) -> Tensor:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a LongTensor [batch, length], got {tuple(input_ids.shape)} "
                f"{input_ids.dtype}"
            )
        n = input_ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {n} exceeds the model's max_seq_len {self.cfg.max_seq_len}"
            )
        pos = torch.arange(n, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, key_padding)
        return self.ln_f(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


class CausalLM(_Trunk):
    """GPT-style language model: ``model(input_ids) -> logits [B, L, V]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg, causal=True)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def output_weight(self) -> Tensor:
        return self.tok.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hidden(input_ids) @ self.output_weight.T

    def hvp_and_tangents(
        self, params, tangents, input_ids, targets, token_weights, seq_weights, options=None
    ):
        """The forward-over-reverse pass of ``meta_step``, written out by hand for this model
        (``options``: a :class:`~datarater.models.forward_over_reverse.PassOptions`).

        Returns None when the computation was changed (a subclass's forward, a hook, a
        replaced layer or setting: ``computes_as_written``), so that the caller falls back to
        the generic pass. See :mod:`datarater.models.forward_over_reverse`.
        """
        if type(self).forward is not CausalLM.forward or type(self).hidden is not _Trunk.hidden:
            return None
        from .forward_over_reverse import causal_lm_hvp, computes_as_written

        names = {name for name, _ in self.named_parameters()}
        if not computes_as_written(self) or not set(params) <= names:
            return None  # (other names: called through a wrapper, such as torch.compile's)

        return causal_lm_hvp(
            self, params, tangents, input_ids, targets, token_weights, seq_weights, options
        )


class Rater(_Trunk):
    """Non-causal transformer with a score head: ``rater(input_ids) -> scores [B]``.

    Mean-pools the final hidden states (over non-padding positions when ``pad_id`` is set) and
    maps them to one real number per sequence.
    """

    def __init__(self, cfg: TransformerConfig, pad_id: int | None = None) -> None:
        super().__init__(cfg, causal=False)
        self.pad_id = pad_id
        self.head = nn.Linear(cfg.d_model, 1)
        # Small but non-zero: scores start near 0 (uniform weights) and every parameter gets a
        # meta-gradient from the first step.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, padded: bool = True) -> Tensor:
        """``padded=False`` promises that no row holds padding (scoring knows it from the
        lengths), which spares the mask and lets fused attention take its fastest kernel."""
        pad = None if self.pad_id is None or not padded else input_ids.eq(self.pad_id)
        if pad is not None:
            pad = pad & ~pad.all(dim=1, keepdim=True)  # an all-padding row attends to itself
        h = self.hidden(input_ids, pad)
        if pad is None:
            pooled = h.mean(dim=1)
        else:  # pooled in at least float32: bf16 cannot count lengths above 256 exactly
            acc = torch.promote_types(h.dtype, torch.float32)
            keep = (~pad).unsqueeze(-1).to(acc)
            pooled = ((h.to(acc) * keep).sum(1) / keep.sum(1).clamp_min(1.0)).to(h.dtype)
        return self.head(pooled).squeeze(-1)
