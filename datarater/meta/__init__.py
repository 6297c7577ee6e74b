"""Meta-gradients: the inner state, batches, and ``meta_step``."""

from .batch import SeqBatch, sequence_losses
from .meta_step import MODES, MetaStepResult, NonFiniteMetaGradient, meta_step, weighted_steps
from .state import InnerState

__all__ = [
    "MODES",
    "InnerState",
    "MetaStepResult",
    "NonFiniteMetaGradient",
    "SeqBatch",
    "meta_step",
    "sequence_losses",
    "weighted_steps",
]
