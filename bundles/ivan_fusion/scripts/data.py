"""Slice serving for 2D training on 3D volumes, checkpoint lookup and the semi-synthetic fusion demo."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError

__all__ = [
    "SliceDataset",
    "VolumeBlockSampler",
    "TaskRecord",
    "task_record",
    "check_checkpoint_task",
    "load_datalist",
    "require_file",
    "check_cases",
    "check_options",
    "check_resume",
    "refuse_existing_checkpoints",
    "latest_checkpoint",
    "build_fusion_demo",
]

#: keys the pipeline writes itself: not usable as modality names
RESERVED_KEYS = ("image", "label", "pred", "id", "case", "slice")


class SliceDataset(Dataset):
    """Every 2D slice of a dataset of 3D volumes, as one training item, holding at most ``cache_volumes`` volumes.

    ``volumes[i]`` is a dict whose ``keys`` are ``(C, H, W, D)`` tensors (e.g. a ``monai.data.Dataset`` after
    ``VariableAugmentd``: each access loads and preprocesses the volume). Item ``j`` is ``{key: (C, a, b)}`` for
    one ``(volume, slice)`` pair along the spatial axis ``slice_axis`` (0, 1 or 2), plus ``case`` and ``slice``
    indices. Slices whose ``skip_empty_key`` is all zero (background outside the head) are left out. The index is
    built once, in volume order (one pass over the volumes, nothing kept beyond the cache), so a seeded sampler
    gives the same sequence on every run.

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
        skip_empty_key: str | None = "image",
        transform: Callable | None = None,
        cache_volumes: int | None = 8,
    ) -> None:
        from collections import OrderedDict

        self.volumes, self.keys = volumes, tuple(keys)
        self.axis = int(slice_axis) % 3 + 1  # channel first
        self.transform = transform
        if cache_volumes is not None and int(cache_volumes) < 1:
            raise InvalidInputError(f"config key 'cache_volumes' is {cache_volumes!r}; expected an integer >= 1 or null")
        self.cache_volumes = None if cache_volumes is None else int(cache_volumes)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self.index: list[tuple[int, int]] = []
        for i in range(len(volumes)):
            item = self._volume(i)
            ref = torch.as_tensor(item[skip_empty_key if skip_empty_key else self.keys[0]])
            n = ref.shape[self.axis]
            if skip_empty_key is None:
                self.index += [(i, s) for s in range(n)]
            else:
                nonzero = torch.movedim(ref, self.axis, 0).reshape(n, -1).abs().amax(dim=1) > 0
                self.index += [(i, int(s)) for s in torch.nonzero(nonzero).flatten()]
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
        return self.transform(out) if self.transform is not None else out


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


def _join(base: str, value):
    """``base/value`` for a relative path (or a list of them); other values unchanged."""
    if isinstance(value, str) and value:
        return os.path.normpath(os.path.join(base, value))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [os.path.normpath(os.path.join(base, v)) for v in value]
    return value


def load_datalist(path: str, key: str, base_dir: str | None = None, id_key: str = "id") -> list[dict]:
    """The ``key`` list of a Decathlon-style datalist, every file path joined to ``base_dir`` (default: the
    JSON's folder); or, when ``path`` does not exist yet, an empty list.

    Building a workflow (e.g. ``check_properties`` of a freshly downloaded bundle) must not need the data;
    running it does: ``run`` starts with :func:`require_file`. Unlike ``monai.data.load_decathlon_datalist``,
    which joins a modality path only when the joined file exists, every path is joined, so that a missing
    file is reported with its full path. Raises :class:`InvalidInputError` for a file that is not JSON, has
    no ``key`` list, or whose entries are not one dict per case.
    """
    if not os.path.isfile(path):
        return []
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"datalist '{path}' is not valid JSON ({e}); expected a Decathlon-style JSON") from e
    if not isinstance(data, dict) or key not in data:
        have = sorted(k for k, v in data.items() if isinstance(v, list)) if isinstance(data, dict) else []
        raise InvalidInputError(
            f"datalist '{path}' has no '{key}' list (its lists: {have}); expected a Decathlon-style JSON with "
            "'training', 'validation' and 'test' lists of cases"
        )
    items = data[key]
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise InvalidInputError(
            f"'{key}' in datalist '{path}' must be a list with one dict per case "
            "({'id': ..., '<modality>': '<file>'}), got " + type(items).__name__
        )
    base = base_dir or os.path.dirname(path)
    return [{k: (v if k == id_key else _join(base, v)) for k, v in it.items()} for it in items]


def require_file(path: str, what: str = "datalist", key: str = "datalist") -> str:
    """Raise :class:`InputNotFoundError` naming the config key to override when ``path`` is missing."""
    if not os.path.isfile(path):
        raise InputNotFoundError(
            f"{what} '{path}' does not exist: expected a Decathlon-style JSON file; pass --dataset_dir or --{key}"
        )
    return path


def _case_name(item: Mapping, index: int, id_key: str = "id") -> str:
    return f"case '{item[id_key]}'" if item.get(id_key) is not None else f"case #{index}"


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
        missing = [k for k in keys if it.get(k) in (None, "", [])]
        if missing:
            raise InvalidInputError(
                f"{_case_name(it, i, id_key)} in the '{split}' list of datalist '{datalist}' has no "
                f"{' and no '.join(repr(m) for m in missing)} image; task '{name}' needs {list(keys)} for every case "
                f"(it has {sorted(str(k) for k in it if k != id_key)})"
            )
        for k in [*keys, *(o for o in optional_keys if it.get(o) not in (None, "", []))]:
            for p in it[k] if isinstance(it[k], list) else [it[k]]:
                if not isinstance(p, (str, os.PathLike)):
                    raise InvalidInputError(
                        f"{_case_name(it, i, id_key)} in datalist '{datalist}': '{k}' is {p!r}; expected a file path"
                    )
                check_image_file(p, k)
                dims = nifti_header_dims(p)  # a 4D series in a later case must stop the run before any output
                volumes = int(np.prod([d for d in dims[3:] if d > 1])) if dims else 1
                if volumes > 1:
                    raise InvalidInputError(
                        f"input file '{p}' (key '{k}', {_case_name(it, i, id_key)} of the '{split}' list of datalist "
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
    the model, checked by :func:`check_checkpoint_task` before inference, evaluation or a resumed training loads
    the weights. ``load_state_dict`` refuses a record of another task (:class:`CheckpointError`)."""

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


def check_checkpoint_task(path: str, task: Mapping, augmentation: str, channels: int,
                          sha256: str | None = None, key: str = "ckpt_path") -> None:
    """Before any weight is loaded: the checkpoint ``path`` was trained for this task. Its ``task`` entry (written
    by this bundle's training) must name the same sources and targets in the same order, the same augmentation and
    channel count, else :class:`~common.utils.io.CheckpointError` naming both tasks. A checkpoint without the
    entry (a bare state dict, or one from before the entry existed) is loaded with a warning: it cannot be checked.
    Raises the errors of :func:`common.utils.io.load_checkpoint` (missing file, sha256 mismatch, unreadable)."""
    import logging

    from common.utils.io import load_checkpoint

    ckpt = load_checkpoint(path, sha256=sha256)
    wanted = task_record(task, augmentation, channels)
    if "task" not in ckpt:
        logging.getLogger("ivan_fusion").warning(
            f"checkpoint '{path}' ({key}) records no task: cannot check that it was trained for {_describe(wanted)}"
        )
        return
    _compare_task(ckpt["task"], wanted, f"checkpoint '{path}' ({key})")


def check_resume(path: str, network: torch.nn.Module, sha256: str | None = None,
                 entries: Sequence[str] = ("model", "optimizer", "lr_scheduler", "trainer"),
                 task: Mapping | None = None, augmentation: str = "replicate", channels: int = 2) -> None:
    """Check the checkpoint a resumed training will load, before the trainer (and its log files) is built:
    it exists, matches ``sha256`` when given, holds every entry in ``entries``, fits ``network`` and, when it
    records a task and ``task`` is given, was trained for that task.
    Raises the errors of :func:`common.utils.io.load_checkpoint` and :class:`~common.utils.io.CheckpointError`."""
    from common.utils.io import CheckpointError, check_state_fits, load_checkpoint

    ckpt = load_checkpoint(path, sha256=sha256)
    missing = [k for k in entries if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' (resume_ckpt) has no entries {missing} (it has {sorted(ckpt)[:8]}); expected a "
            "training checkpoint of this bundle: is it a checkpoint of another bundle?"
        )
    if task is not None and "task" in ckpt:
        _compare_task(ckpt["task"], task_record(task, augmentation, channels), f"checkpoint '{path}' (resume_ckpt)")
    check_state_fits(network, ckpt["model"], f"checkpoint '{path}' (resume_ckpt) entry 'model'")


def refuse_existing_checkpoints(ckpt_dir: str, resume: bool = False, overwrite: bool = False) -> None:
    """A new training (``resume`` false) must not replace the checkpoints of an earlier one: raise
    :class:`OutputExistsError` naming them unless ``overwrite``."""
    if resume or overwrite or not os.path.isdir(ckpt_dir):
        return
    found = sorted(
        os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(ckpt_dir), "*.pt"))
        if os.path.basename(f) == "model.pt" or re.search(r"checkpoint_epoch=\d+\.pt$", f)
    )
    if found:
        raise OutputExistsError(
            f"checkpoint folder '{ckpt_dir}' (ckpt_dir) already holds {found[:4]} of an earlier training; "
            "set 'resume' to true to continue it, 'overwrite' to true to replace them, or choose another ckpt_dir"
        )


def latest_checkpoint(ckpt_dir: str, default: str = "model.pt") -> str:
    """Newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (largest ``N``), else ``ckpt_dir/default``."""
    best, best_epoch = os.path.join(ckpt_dir, default), -1
    for f in glob.glob(os.path.join(ckpt_dir, "checkpoint_epoch=*.pt")):
        m = re.search(r"checkpoint_epoch=(\d+)\.pt$", f)
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = f, int(m.group(1))
    return best


# Approximate CT numbers (HU) per SPM tissue class, for a CT-like image of the ICBM-152 head.
def build_fusion_demo(out_dir: str | os.PathLike, t2_path: str | os.PathLike, tpm_path: str | os.PathLike) -> Path:
    """Semi-synthetic T2 + CT fusion pair for tests and the benchmark (not for distribution).

    The CT-like image is the SPM tissue-probability map (6 classes incl. bone) weighted by typical HU values and
    resampled (trilinear) onto the T2 grid; both come from the same ICBM-152 space, so they are co-registered.
    Writes ``<out_dir>/fusion/{t2,ct}.nii.gz`` and ``datalist.json`` with the pair in training, validation and
    test (the fusion target is a rule of the two inputs, so this is a smoke test of the pipeline, not a
    generalisation experiment).
    """
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    from common.data.mri_sim import ct_like

    root = Path(out_dir) / "fusion"
    root.mkdir(parents=True, exist_ok=True)
    t2 = nib.load(str(t2_path))
    tpm = nib.load(str(tpm_path))
    t2_arr = np.asarray(t2.dataobj, dtype=np.float32)
    probs = np.asarray(tpm.dataobj, dtype=np.float32)
    hu = ct_like(probs)  # TPM's classes are in the simulator's tissue order (GM, WM, CSF, bone, soft, air)
    # voxel coordinates of the T2 grid in the TPM grid
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in t2_arr.shape], indexing="ij"), 0).reshape(3, -1)
    vox = np.linalg.inv(tpm.affine) @ t2.affine @ np.vstack([ijk, np.ones((1, ijk.shape[1]))])
    ct = map_coordinates(hu, vox[:3], order=1, mode="nearest").reshape(t2_arr.shape).astype(np.float32)
    nib.Nifti1Image(t2_arr, t2.affine).to_filename(str(root / "t2.nii.gz"))
    nib.Nifti1Image(ct, t2.affine).to_filename(str(root / "ct.nii.gz"))
    item = {"id": "icbm152", "t2": "t2.nii.gz", "ct": "ct.nii.gz"}
    datalist = {
        "name": "icbm152_t2_ct_fusion_demo",
        "description": "SPM avg152T2 and a CT-like image from SPM's TPM (HU-weighted tissue classes); GPL-2 derived, local use only",
        "task": {"inputs": ["t2", "ct"], "target": "fused"},
        "training": [item], "validation": [item], "test": [item],
    }
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path
