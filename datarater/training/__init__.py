"""Meta-training: the population trainer and its checkpoints."""

from .trainer import TrainConfig, Trainer, load_rater, save_rater

__all__ = ["TrainConfig", "Trainer", "load_rater", "save_rater"]
