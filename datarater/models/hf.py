"""datarater's attention inside Hugging Face models: ``attn_implementation="datarater"``.

PyTorch's fused attention (Hugging Face's default ``sdpa``) has no forward-mode derivative and
no double backward, so inside ``meta_step`` it runs on its math kernel with L x L scores per
head. Importing this module registers :func:`datarater.kernels.attention` with transformers'
attention and mask interfaces under the name ``"datarater"``; then either load a model with
``attn_implementation="datarater"`` or switch one with :func:`use_datarater_attention`.

It takes what a training batch makes: causal (or bidirectional) attention, with a padding mask
or none, grouped-query heads, any ``scaling``. Other mask patterns (sliding windows, packed
sequences, a cache with an offset) are refused by name; use ``"sdpa"`` for those.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers import masking_utils as _masks

from ..kernels.attention import attention

NAME = "datarater"


def datarater_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention signature: ``query [B, H, L, D]``, ``key``/``value``
    ``[B, Hkv, L, D]``, the mask :func:`datarater_mask` made; returns ``([B, L, H, D], None)``."""
    if dropout:
        raise ValueError(
            f"datarater attention has no dropout (the module asks for {dropout}): call .eval() "
            "or set the model's attention dropout to 0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "datarater attention takes causal or bidirectional attention with a padding mask; "
            f"this model asked for a {attention_mask.dim()}-D mask (a sliding window, packed "
            "sequences or a cache?): use attn_implementation='sdpa' for it"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"datarater attention takes as many keys as queries (self-attention without a "
            f"cache), got {query.shape[2]} queries and {key.shape[2]} keys"
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    keep = None if attention_mask is None else attention_mask.bool()
    out = attention(query, key, value, keep=keep, causal=bool(causal), scale=scaling)
    return out, None


def datarater_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=_masks.causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs,
):
    """The padding mask ``[B, L]`` (None: no padding) where the pattern is plain causal or
    bidirectional; else the 4-D mask sdpa would get, which the attention refuses by name."""
    plain = mask_function in (_masks.causal_mask_function, _masks.bidirectional_mask_function)
    if plain and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:].bool()
        return None if bool(attention_mask.all()) else attention_mask
    return _masks.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        **kwargs,
    )  # fmt: skip


def register() -> None:
    """Make ``attn_implementation="datarater"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, datarater_attention_forward)
    _masks.AttentionMaskInterface.register(NAME, datarater_mask)


def use_datarater_attention(model: nn.Module) -> nn.Module:
    """Switch a loaded Hugging Face model (and its sub-models) to datarater's attention."""
    register()
    model.set_attn_implementation(NAME)
    return model


register()
