"""Proving that curation paid: fresh LMs on filtered vs raw data, and the compute saved."""

from .evaluate import EvalConfig, compute_gain, run_evaluation, steps_to_reach
from .lm import (
    forward_flops_per_token,
    pick,
    rater_flops_per_token,
    sequence_nll,
    train_flops_per_token,
    train_lm,
)

__all__ = [
    "EvalConfig",
    "compute_gain",
    "forward_flops_per_token",
    "pick",
    "rater_flops_per_token",
    "run_evaluation",
    "sequence_nll",
    "steps_to_reach",
    "train_flops_per_token",
    "train_lm",
]
