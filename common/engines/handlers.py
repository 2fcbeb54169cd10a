"""Ignite handlers shared by every bundle."""

from __future__ import annotations

from typing import Any

from collections.abc import Mapping

from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver
from monai.utils import set_determinism

__all__ = ["AtomicCheckpointSaver", "EpochSeedHandler"]


class _RemoveAfterSave(BaseSaveHandler):
    """Wrap a save handler so that files are removed only after the next save has landed.

    Ignite's ``Checkpoint`` with ``n_saved=1`` removes the previous file *before* writing the
    new one; a process killed during that write would leave no checkpoint at all.
    """

    def __init__(self, inner: BaseSaveHandler) -> None:
        self.inner = inner
        self.pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        self.inner(checkpoint, filename, metadata)
        pending, self.pending = self.pending, []
        if getattr(self.inner, "filename", None) is not None:
            # MONAI's saver writes every checkpoint of this kind under one fixed name and maps
            # any removal back to it: the atomic rename has already replaced the old file.
            return
        for old in pending:
            if old != filename:
                try:
                    self.inner.remove(old)
                except FileNotFoundError:
                    pass

    def remove(self, filename: str) -> None:
        self.pending.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose checkpoints survive a crash at any moment.

    - Every file is written to a temporary name and renamed into place (MONAI 1.6.1 turns
      Ignite's atomic saving off to keep group-read permissions; Ignite 0.5.5 restores those
      permissions itself, so it is safe to turn back on).
    - The checkpoint being replaced is deleted only after the new one is complete.
    A process killed while writing therefore leaves the previous checkpoint intact and loadable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True
                ckpt.save_handler = _RemoveAfterSave(ckpt.save_handler)


class EpochSeedHandler:
    """Re-seed every random generator at the start of each epoch from ``seed + epoch``.

    Shuffling and random transforms then depend only on the epoch number, not on how many
    random numbers earlier epochs consumed, so a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would have seen. ``set_determinism`` seeds torch, numpy and
    ``random``; MONAI's random transforms keep their own ``RandomState``, so the data loader's
    dataset transforms are re-seeded as well (``monai.data.utils.set_rnd``). When
    ``epoch_length`` is shorter than the loader, Ignite would keep one iterator running across
    epochs (epoch 2 continuing epoch 1's shuffle); the iterator is restarted here, so each epoch
    takes the first ``epoch_length`` batches of its own seeded order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        from monai.data.utils import set_rnd

        seed = self.seed + int(engine.state.epoch)
        set_determinism(seed=seed)
        loader = getattr(engine.state, "dataloader", None)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            set_rnd(dataset, seed)
        if loader is not None:
            engine.set_data(loader)
