"""Slice serving for 2D training on 3D volumes, the checks of a datalist's cases and the task a checkpoint records.

Datalists, case names, outputs and the training-checkpoint policy (new run, ``resume``, ``finetune``,
``overwrite``) are the shared ones of :mod:`common.bundle`; the configs call them directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.bundle import check_checkpoint, describe_case
from common.utils.errors import InvalidInputError

__all__ = [
    "SliceDataset",
    "VolumeBlockSampler",
    "TaskRecord",
    "task_record",
    "check_checkpoint_task",
    "check_train_checkpoint",
    "check_cases",
    "check_options",
]

#: keys the pipeline writes itself: not usable as modality names
RESERVED_KEYS = ("image", "label", "pred", "id", "case", "slice")


class SliceDataset(Dataset):
    """Every 2D slice of a dataset of 3D volumes, as one training item, holding at most ``cache_volumes`` volumes.

    ``volumes[i]`` is a dict whose ``keys`` are ``(C, H, W, D)`` tensors (e.g. a ``monai.data.Dataset`` of the
    loaded modalities, as ``train.json`` builds it: each access loads and preprocesses the volume). Item ``j`` is
    ``{key: (C, a, b)}`` for one ``(volume, slice)`` pair along the spatial axis ``slice_axis`` (0, 1 or 2), plus
    ``case`` and ``slice`` indices, passed through ``slice_transform`` when one is given (per-slice work such as
    random intensity augmentation and the fusion target of the augmented sources; not named ``transform``,
    because MONAI's bundle property check reads ``train#dataset#transform`` as the training preprocessing, which
    is ``train#preprocessing``, the volumes' transform). Slices where every ``skip_empty_key`` (one key or
    several) is all zero (background outside the head) are left out. The index is built once, in volume order
    (one pass over the volumes, nothing kept beyond the cache), so a seeded sampler gives the same sequence on
    every run.

    Memory: the last ``cache_volumes`` volumes used are kept (least recently used first out), so RAM does not grow
    with the number of subjects; ``None`` keeps every volume (the old behaviour, fine for small datasets). Use
    :class:`VolumeBlockSampler` so that consecutive items come from the cached volumes (a plain shuffle over all
    slices would load a volume for almost every slice).
    """

    def __init__(
        self,
        volumes: Sequence,
        keys: Sequence[str] = ("image", "label"),
        slice_axis: int = 2,
        skip_empty_key: str | Sequence[str] | None = "image",
        slice_transform: Callable | None = None,
        cache_volumes: int | None = 8,
    ) -> None:
        from collections import OrderedDict

        self.volumes, self.keys = volumes, tuple(keys)
        self.axis = int(slice_axis) % 3 + 1  # channel first
        self.slice_transform = slice_transform
        if cache_volumes is not None and int(cache_volumes) < 1:
            raise InvalidInputError(f"config key 'cache_volumes' is {cache_volumes!r}; expected an integer >= 1 or null")
        self.cache_volumes = None if cache_volumes is None else int(cache_volumes)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self.index: list[tuple[int, int]] = []
        empty_keys = [skip_empty_key] if isinstance(skip_empty_key, str) else list(skip_empty_key or ())
        for i in range(len(volumes)):
            item = self._volume(i)
            n = torch.as_tensor(item[(empty_keys or self.keys)[0]]).shape[self.axis]
            keep = torch.full((n,), not empty_keys)  # no key to check: every slice
            for k in empty_keys:  # kept where any of them has signal
                keep |= torch.movedim(torch.as_tensor(item[k]), self.axis, 0).reshape(n, -1).abs().amax(dim=1) > 0
            self.index += [(i, int(s)) for s in torch.nonzero(keep).flatten()]
        if len(volumes) and not self.index:
            raise InvalidInputError(
                f"no slice of the {len(volumes)} training volume(s) has a non-zero '{skip_empty_key}' after cropping "
                "(train_crop); expected volumes with signal inside the crop"
            )

    def _volume(self, i: int) -> dict:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        item = self.volumes[i]
        item = {k: item[k] for k in self.keys if k in item} if isinstance(item, Mapping) else item
        self._cache[i] = item
        if self.cache_volumes is not None:
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)
        return item

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i, s = self.index[j]
        item = self._volume(i)
        out = {k: torch.as_tensor(item[k]).select(self.axis, s).clone() for k in self.keys}
        out["case"], out["slice"] = i, s
        return self.slice_transform(out) if self.slice_transform is not None else out


class VolumeBlockSampler(torch.utils.data.Sampler):
    """Shuffled slice order that visits the volumes in blocks of ``block`` volumes: each epoch the volumes are
    permuted, cut into blocks, and the slices of one block are shuffled together before the next block starts.
    With ``block`` equal to the dataset's ``cache_volumes``, each volume is loaded once per epoch. Uses the
    global torch generator (seeded per epoch by ``EpochSeedHandler``): runs and resumed runs see the same order.
    ``shuffle=False`` gives the index order.
    """

    def __init__(self, dataset: SliceDataset, block: int | None = 8, shuffle: bool = True) -> None:
        self.dataset, self.shuffle = dataset, bool(shuffle)
        self.block = None if block is None else max(1, int(block))

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        index = self.dataset.index
        if not self.shuffle:
            yield from range(len(index))
            return
        by_volume: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(index):
            by_volume.setdefault(i, []).append(j)
        vols = [list(by_volume)[k] for k in torch.randperm(len(by_volume)).tolist()]
        step = self.block or max(len(vols), 1)
        for b in range(0, len(vols), step):
            items = [j for v in vols[b : b + step] for j in by_volume[v]]
            yield from (items[k] for k in torch.randperm(len(items)).tolist())


def check_cases(
    items: Sequence[Mapping],
    task: Mapping,
    keys: Sequence[str],
    datalist: str,
    split: str,
    optional_keys: Sequence[str] = (),
    id_key: str = "id",
) -> Sequence[Mapping]:
    """Check a datalist split before any work: it has cases, every case has every modality the run loads
    (``keys``: the task's sources, or its targets in reverse mode, plus the targets for evaluation and
    training), and every file exists and has a plausible image header.

    Raises :class:`InvalidInputError` for an empty split, a reserved or unknown modality name (one that no case
    of the split has: the message names the ``task#inputs``/``task#targets`` key and the modalities the
    datalist has), a case without a modality the task needs (naming the case and the modality), a corrupt
    header; :class:`InputNotFoundError` for a missing file. Checking the headers of every case up front keeps
    a bad file in a later case from stopping a run after earlier outputs were written.
    """
    from common.transforms.validation import check_image_file, nifti_header_dims

    name = task.get("name", "?") if isinstance(task, Mapping) else "?"
    inputs = list(task.get("inputs", [])) if isinstance(task, Mapping) else []
    targets = list(task.get("targets", [])) if isinstance(task, Mapping) else []

    def origin(k: str) -> str:
        return "task#inputs" if k in inputs else "task#targets" if k in targets else "load_keys"

    for k in keys:
        if k in RESERVED_KEYS:
            raise InvalidInputError(
                f"modality name '{k}' in {origin(k)} is reserved (the pipeline writes {list(RESERVED_KEYS)}); "
                "expected a modality name of the datalist such as 't1'"
            )
    if not items:
        raise InvalidInputError(f"datalist '{datalist}' has no case in its '{split}' list; expected at least one")
    known = sorted({str(k) for it in items for k in it if k != id_key})
    for k in keys:
        if not any(k in it for it in items):
            raise InvalidInputError(
                f"modality '{k}' in {origin(k)} of task '{name}' is in no case of the '{split}' list of datalist "
                f"'{datalist}' (an unknown modality name, or a modality missing from the datalist); expected one of "
                f"the modalities there: {', '.join(known)}"
            )
    for i, it in enumerate(items):
        who, missing = f"case {describe_case(it, i, id_key, keys)}", [k for k in keys if it.get(k) in (None, "", [])]
        if missing:
            raise InvalidInputError(
                f"{who} in the '{split}' list of datalist '{datalist}' has no "
                f"{' and no '.join(repr(m) for m in missing)} image; task '{name}' needs {list(keys)} for every case "
                f"(it has {sorted(str(k) for k in it if k != id_key)})"
            )
        for k in [*keys, *(o for o in optional_keys if it.get(o) not in (None, "", []))]:
            for p in it[k] if isinstance(it[k], list) else [it[k]]:
                if not isinstance(p, (str, os.PathLike)):
                    raise InvalidInputError(
                        f"{who} in datalist '{datalist}': '{k}' is {p!r}; expected a file path"
                    )
                check_image_file(p, k)
                dims = nifti_header_dims(p)  # a 4D series in a later case must stop the run before any output
                volumes = int(np.prod([d for d in dims[3:] if d > 1])) if dims else 1
                if volumes > 1:
                    raise InvalidInputError(
                        f"input file '{p}' (key '{k}', {who} of the '{split}' list of datalist "
                        f"'{datalist}') is a {len(dims)}D image with {volumes} volumes/channels (header dimensions "
                        f"{dims}); expected a 3D image (1 channel) or a 2D slice"
                    )
    return items


def check_options(direction: str | None = None, augmentation: str | None = None,
                  fusion_target: str | None = None, is_fusion: bool = False) -> None:
    """Config values with a fixed set of choices, checked before anything is built: one
    :class:`InvalidInputError` naming the key and the choices."""
    choices = {
        "direction": (direction, ("forward", "reverse", "both")),
        "augmentation": (augmentation, ("replicate", "dummy_copy", "zeros")),
        "fusion_target": (fusion_target if is_fusion else None, ("laplacian_maxabs", "average", "datalist")),
    }
    for key, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise InvalidInputError(f"config key '{key}' is {value!r}; expected one of {list(allowed)}")


def task_record(task: Mapping, augmentation: str, channels: int) -> dict:
    """What a checkpoint of this bundle records about the task it was trained for: task name, source and target
    modalities in channel order (their roles), augmentation scheme and channel count."""
    return {
        "name": str(task.get("name", "")), "inputs": [str(m) for m in task.get("inputs", [])],
        "targets": [str(m) for m in task.get("targets", [])], "augmentation": str(augmentation),
        "channels": int(channels),
    }


class TaskRecord:
    """Checkpoint entry ``task`` (see :func:`task_record`): saved by the training config's checkpoint saver next to
    the model, checked (:func:`check_checkpoint_task`, :func:`check_train_checkpoint`) before inference, evaluation,
    a resumed or a fine-tuned training loads the weights. ``load_state_dict`` refuses another task's record."""

    def __init__(self, task: Mapping, augmentation: str = "replicate", channels: int = 2) -> None:
        self.record = task_record(task, augmentation, channels)

    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state: Mapping) -> None:
        _compare_task(state, self.record, "checkpoint")


def _describe(rec: Mapping) -> str:
    return (f"task '{rec.get('name')}' ({' + '.join(rec.get('inputs', []))} -> {' + '.join(rec.get('targets', []))}, "
            f"augmentation {rec.get('augmentation')}, {rec.get('channels')} channels)")


def _compare_task(saved: Mapping, wanted: Mapping, source: str, key: str = "check_ckpt_task") -> None:
    from common.utils.io import CheckpointError

    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source} has a 'task' entry of type {type(saved).__name__}; expected a dict")
    diff = [k for k in ("inputs", "targets", "augmentation", "channels") if saved.get(k) != wanted.get(k)]
    if diff:
        raise CheckpointError(
            f"{source} was trained for {_describe(saved)}; this run is {_describe(wanted)}: the channel roles differ "
            f"({', '.join(diff)}). Use a checkpoint trained for this task (if only the modality names differ, rename "
            f"them in the datalist and 'task', or set '{key}' to false)"
        )


def check_checkpoint_task(path: str, task: Mapping, augmentation: str, channels: int, sha256: str | None = None,
                          key: str = "ckpt_path", ckpt: Mapping | None = None) -> None:
    """Before any weight is loaded: the checkpoint ``path`` (``ckpt`` when already loaded) was trained for this
    task. Its ``task`` entry (written by this bundle's training) must name the same sources and targets in the same
    order, the same augmentation and channel count, else :class:`~common.utils.io.CheckpointError` naming both
    tasks. A checkpoint without the entry (a bare state dict, or one from before the entry existed) is loaded with a
    warning: it cannot be checked. Raises the errors of :func:`common.utils.io.load_checkpoint` (missing file,
    sha256 mismatch, unreadable)."""
    from common.utils.io import load_checkpoint

    ckpt = load_checkpoint(path, sha256=sha256) if ckpt is None else ckpt
    wanted, source = task_record(task, augmentation, channels), f"checkpoint '{path}' (config key '{key}')"
    if "task" not in ckpt:
        logging.getLogger("ivan_fusion").warning(f"{source} records no task: cannot check that it was trained for "
                                                 f"{_describe(wanted)}")
        return
    _compare_task(ckpt["task"], wanted, source)


def check_train_checkpoint(path: str, network: torch.nn.Module, task: Mapping, augmentation: str, channels: int,
                           sha256: str | None = None, key: str = "resume_ckpt",
                           entries: Sequence[str] = ("model", "optimizer", "lr_scheduler", "trainer"),
                           check_task: bool = True) -> None:
    """The checkpoint a training resumes (``resume_ckpt``, all of ``entries``) or fine-tunes from (``finetune_ckpt``,
    ``entries=()``: a training checkpoint or a bare state dict of the network), checked before the trainer (and its
    log files) is built: :func:`common.bundle.check_checkpoint` (exists, digest, ``entries``, its ``model`` fits
    ``network``), then, unless ``check_task`` (config key ``check_ckpt_task``) is false, the task it records
    (:func:`check_checkpoint_task`): a synthesis checkpoint neither resumes nor fine-tunes the fusion task."""
    ckpt = check_checkpoint(path, sha256, key, entries, network, "model")
    if check_task:
        check_checkpoint_task(path, task, augmentation, channels, key=key, ckpt=ckpt)
