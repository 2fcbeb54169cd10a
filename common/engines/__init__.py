"""Ignite engines, handlers and helpers shared by the bundles."""

from .handlers import AtomicCheckpointSaver, EpochSeedHandler
from .utils import get_device, resolve_amp

__all__ = ["AtomicCheckpointSaver", "EpochSeedHandler", "get_device", "resolve_amp"]
