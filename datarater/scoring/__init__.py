"""Scoring and filtering corpora with a trained rater."""

from .filtering import EmpiricalCDF, accept, group_size, p_accept, quantile_keep, topk_groups

__all__ = ["EmpiricalCDF", "accept", "group_size", "p_accept", "quantile_keep", "topk_groups"]
