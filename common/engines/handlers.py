"""Ignite handlers shared by every bundle."""

from __future__ import annotations

from typing import Any

from collections.abc import Mapping

from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler
from monai.utils import set_determinism

__all__ = ["AtomicCheckpointSaver", "EpochSeedHandler", "LastEpochValidationHandler", "SafeCheckpointLoader"]


class LastEpochValidationHandler(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also validates the last epoch of a run when it is not a
    multiple of ``interval``.

    Without it, a run shorter than ``interval`` epochs (one MONAI Label training round of ``max_epochs`` 1,
    a short fine-tune) never validates, so the best-metric checkpoint (``models/model.pt``) is never written
    and the run ends with exit 0 having produced no model; a longer run loses its last epochs to the
    model selection. Iteration-level validation is unchanged.
    """

    def attach(self, engine) -> None:
        from ignite.engine import Events

        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.COMPLETED, self._validate_last_epoch)

    def _validate_last_epoch(self, engine) -> None:
        if engine.state.epoch > 0 and engine.state.epoch % self.interval != 0:
            self(engine)


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

    def exception_raised(self, engine, e: Exception) -> None:
        """MONAI saves a "final" checkpoint when the run fails (``save_final``), deleting the previous
        one first. A failure caused by bad input is not a state worth keeping and must leave the
        folder as it was: re-raise without saving. Other failures keep MONAI's behaviour."""
        from common.utils.errors import find_user_error

        if find_user_error(e) is not None:
            raise e
        super().exception_raised(engine, e)


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


class SafeCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` that never trusts the file blindly.

    Same arguments as MONAI's loader, plus ``sha256`` (optional expected digest of the file). A file that is one
    plain state dict (name -> tensor) serves a single object of ``load_dict`` as it is, and several objects when
    its keys are ``"<entry>.<key>"`` (the layout of shipped weights, e.g. ``ema.module.*`` and
    ``step.scale_factor``). The file
    is loaded by :func:`common.utils.io.load_checkpoint` (``weights_only=True``, the sha256 checked
    first), and every module in ``load_dict`` is checked against it before anything is loaded, so a
    missing file, a foreign file (another bundle's checkpoint, another configuration's shapes) or a
    damaged one ends in one :class:`common.utils.io.CheckpointError` (or ``InputNotFoundError`` /
    ``HashMismatchError``) that names the file and the mismatching keys, and no network is left
    half-loaded. ``strict=False`` keeps MONAI's meaning: missing/unexpected keys are allowed, shape
    mismatches are still refused unless ``strict_shape=False``.
    """

    def __init__(self, load_path: str, load_dict: dict, sha256: str | None = None, **kwargs: Any) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        self.sha256 = sha256 or None

    def __call__(self, engine) -> None:
        import torch
        from ignite.handlers import Checkpoint
        from monai.networks.utils import copy_model_state

        from common.utils.io import CheckpointError, check_state_fits, load_checkpoint

        checkpoint = load_checkpoint(self.load_path, sha256=self.sha256, map_location=self.map_location or "cpu")
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in checkpoint:
            checkpoint = {first: checkpoint}  # a bare state dict for a single object, as MONAI allows
        elif not any(k in checkpoint for k in self.load_dict) and checkpoint and all(
            torch.is_tensor(v) for v in checkpoint.values()
        ):
            # one plain state dict for several objects, each key "<entry>.<key>" (a shipped weights file)
            entries = {
                k: {n[len(k) + 1 :]: v for n, v in checkpoint.items() if n.startswith(k + ".")}
                for k in self.load_dict
                if any(n.startswith(k + ".") for n in checkpoint)
            }
            checkpoint = entries or checkpoint  # none of them: the error below names the file's own keys
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing:
            raise CheckpointError(
                f"checkpoint '{self.load_path}' has no entries {missing} (it has {sorted(checkpoint)[:8]}); "
                "is it a checkpoint of another bundle or another training stage?"
            )
        if self.strict_shape:
            for k, obj in self.load_dict.items():
                if isinstance(obj, torch.nn.Module):
                    # keys and shapes only: raises before any weight is replaced
                    check_state_fits(obj, checkpoint[k], f"checkpoint '{self.load_path}' entry '{k}'", self.strict)
        if not self.strict_shape:
            for k, obj in list(self.load_dict.items()):
                if isinstance(obj, torch.nn.Module):
                    checkpoint[k] = copy_model_state(obj, checkpoint[k], inplace=False)[0]
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            from common.utils.errors import InvalidInputError

            raise InvalidInputError(
                f"checkpoint '{self.load_path}' was saved at epoch {engine.state.epoch}, beyond max_epochs "
                f"{prior_max_epochs}; raise max_epochs to continue training from it"
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")
