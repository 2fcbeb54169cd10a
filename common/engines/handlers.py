"""Ignite handlers shared by every bundle."""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import set_determinism

__all__ = ["AtomicCheckpointSaver", "EpochSeedHandler"]


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` that writes every checkpoint to a temporary file and renames it.

    MONAI 1.6.1 disables Ignite's atomic saving (to keep group-read permissions); Ignite 0.5.5
    restores those permissions itself, so atomic saving is safe to turn back on. A process killed
    while writing leaves the previous checkpoint intact and loadable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True


class EpochSeedHandler:
    """Re-seed every random generator at the start of each epoch from ``seed + epoch``.

    Shuffling and random transforms then depend only on the epoch number, not on how many
    random numbers earlier epochs consumed, so a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        set_determinism(seed=self.seed + int(engine.state.epoch))
