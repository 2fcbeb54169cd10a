"""Noise and learning-rate schedules of the shared package."""

from .diffseg import DiffSegScheduler, resampled_linear_betas, warmup_cosine_lambda

__all__ = ["DiffSegScheduler", "resampled_linear_betas", "warmup_cosine_lambda"]
