"""Record which samples each process trained on, one file per rank.

With ``DistributedSampler`` every rank must see a different part of the data in each epoch. A
bug there (a plain ``RandomSampler`` in the multi-GPU config, the same seed on every rank with
``shuffle`` in the loader) still trains without error, just on duplicated data. Attached to a
trainer, :class:`SampleLogHandler` appends the identifiers of every batch to
``<output_dir>/samples_rank<r>.txt``, so a test (or a user) can check that the ranks' sets are
disjoint and together cover the dataset.

File format, one line per sample, tab-separated: ``epoch  iteration  rank  identifier``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["SampleLogHandler", "read_sample_logs", "sample_ids"]


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", 0))


def _to_strings(value: Any) -> list[str]:
    if isinstance(value, torch.Tensor):
        return [str(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (str, bytes, os.PathLike)):
        return [os.fspath(value) if not isinstance(value, bytes) else value.decode()]
    if isinstance(value, Sequence):
        return [s for v in value for s in _to_strings(v)]
    return [str(value)]


def sample_ids(batch: Any, key: Hashable | None = None) -> list[str]:
    """Identifiers of the samples of a collated batch.

    ``key`` names a batch entry holding ids (strings, numbers, or a tensor of numbers). Without
    it, the ``filename_or_obj`` meta of the first MetaTensor in the batch is used (the file each
    sample was loaded from), then the first of the keys ``"id"``, ``"name"``, ``"subject"``.

    Raises:
        KeyError: ``key`` is not in the batch, or no identifier can be found (message lists the keys).
    """
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping):  # decollated list of dicts
        return [s for item in batch for s in sample_ids(item, key)]
    if not isinstance(batch, Mapping):
        raise KeyError(f"cannot find sample identifiers in a batch of type {type(batch).__name__}; give 'key'")
    if key is not None:
        if key not in batch:
            raise KeyError(f"batch has no key '{key}' for sample identifiers (keys: {sorted(map(str, batch))})")
        return _to_strings(batch[key])
    for value in batch.values():
        if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj") is not None:
            return _to_strings(value.meta["filename_or_obj"])
    for k in ("id", "name", "subject"):
        if k in batch:
            return _to_strings(batch[k])
    raise KeyError(
        "no sample identifiers in the batch: no MetaTensor with 'filename_or_obj' and none of the keys "
        f"'id', 'name', 'subject' (keys: {sorted(map(str, batch))}); give 'key'"
    )


class SampleLogHandler:
    """Ignite handler: after each iteration, append the batch's sample identifiers to a per-rank file.

    Args:
        output_dir: folder of the logs (created if needed); each rank writes
            ``samples_rank<r>.txt`` (rank from ``torch.distributed``, else ``$RANK``, else 0).
        key: batch key holding the identifiers; ``None`` uses the loaded files' names
            (``filename_or_obj``) or an ``id`` entry, see :func:`sample_ids`.

    Each iteration's lines are written with one ``write`` call on a file opened in append mode,
    so a process killed mid-run leaves only whole iterations, and a resumed run continues the
    same file.
    """

    def __init__(self, output_dir: str | os.PathLike, key: Hashable | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.key = key

    @property
    def path(self) -> Path:
        return self.output_dir / f"samples_rank{_rank()}.txt"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        ids = sample_ids(engine.state.batch, self.key)
        rank = _rank()
        lines = "".join(f"{engine.state.epoch}\t{engine.state.iteration}\t{rank}\t{i}\n" for i in ids)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)


def read_sample_logs(output_dir: str | os.PathLike) -> dict[int, list[tuple[int, int, str]]]:
    """``{rank: [(epoch, iteration, identifier), ...]}`` from the files a :class:`SampleLogHandler` wrote."""
    logs: dict[int, list[tuple[int, int, str]]] = {}
    for f in sorted(Path(output_dir).glob("samples_rank*.txt")):
        for line in f.read_text().splitlines():
            epoch, it, rank, ident = line.split("\t", 3)
            logs.setdefault(int(rank), []).append((int(epoch), int(it), ident))
    return logs
