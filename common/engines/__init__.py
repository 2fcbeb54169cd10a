"""Ignite engines, handlers and helpers shared by the bundles."""

from .handlers import AtomicCheckpointSaver, EpochSeedHandler
from .trainers import StepTrainer, TrainingStep
from .utils import get_device, resolve_amp

__all__ = ["AtomicCheckpointSaver", "EpochSeedHandler", "StepTrainer", "TrainingStep", "get_device", "resolve_amp"]
