"""Ignite engines, handlers and helpers shared by the bundles."""

from .handlers import AtomicCheckpointSaver, EpochSeedHandler, LastEpochValidationHandler, SafeCheckpointLoader
from .sample_log import SampleLogHandler
from .tracking import executed_config
from .trainers import StepTrainer, TrainingStep, autocast, engine_device, freeze, optimizer_step, unwrap
from .utils import get_device, resolve_amp

__all__ = [
    "AtomicCheckpointSaver",
    "EpochSeedHandler",
    "LastEpochValidationHandler",
    "SafeCheckpointLoader",
    "SampleLogHandler",
    "StepTrainer",
    "TrainingStep",
    "autocast",
    "engine_device",
    "executed_config",
    "freeze",
    "get_device",
    "optimizer_step",
    "resolve_amp",
    "unwrap",
]
