"""datarater: meta-learned data curation for language-model pre-training."""

from . import kernels, models, optim
from .meta import InnerState, MetaStepResult, NonFiniteMetaGradient, meta_step, weighted_steps

__version__ = "0.1.0"

__all__ = [
    "InnerState",
    "MetaStepResult",
    "NonFiniteMetaGradient",
    "__version__",
    "kernels",
    "meta_step",
    "models",
    "optim",
    "weighted_steps",
]
