"""Transformers usable as inner language models and as raters."""

from .transformer import (
    PRESETS,
    CausalLM,
    Rater,
    TransformerConfig,
    preset,
    set_inference_attention,
)

__all__ = [
    "PRESETS",
    "CausalLM",
    "Rater",
    "TransformerConfig",
    "preset",
    "set_inference_attention",
]
