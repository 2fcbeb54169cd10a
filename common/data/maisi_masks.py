"""MAISI mask database: format, retrieval of candidate masks (official rule), unzipping the official archive, the
candidate queue the sampler walks through, and a small database built from the demo CT.

Format (the official ``candidate_masks_flexible_size_and_spacing_{3000,4000}.json`` of MAISI, so the official
database can be used as is): a JSON list, one entry per label mask::

    {"pseudo_label_filename": "./Task06/labelsTr/lung_001.nii.gz",  # relative to the mask folder (or absolute)
     "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256],          # of that file
     "label_list": [1, 3, 5, ..., 200],                            # MAISI ids present
     "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 0, 1]}   # optional (DDPM)

File names are resolved as the official code does (``os.path.join(mask_foldername, pseudo_label_filename)`` in
``find_masks.py``): against the unzipped mask folder (``datasets/all_masks_flexible_size_and_spacing_4000``) when
one is given, else against the JSON's folder (this collection's small databases keep the masks beside the JSON).
The official folder is unzipped from ``<folder>.zip`` on first use (:func:`ensure_mask_folder`).

Retrieval (official ``LDMSampler.sample_multiple_images`` / ``find_closest_masks`` / ``select_mask`` of
NV-Generate-CTMR and MONAI tutorials ``generation/maisi/scripts/sample.py``; implementation ours):

1. candidates contain every requested anatomy, no tumour unless one is requested and, when the entries carry
   region indices, every requested body region between their top and bottom region;
2. if at least ``num`` candidates match the requested size and spacing exactly, those are used, shuffled;
3. otherwise the closest ones: masks smaller than ``output_size - 64`` voxels along an axis are dropped (they
   would be upsampled too much), the rest ranked by ``sum_axes |FOV - FOV_target| / 10 + |dim - dim_target| / 100
   + |spacing - spacing_target|``; walking down that ranking, a mask is kept only if every requested label
   survives its resampling to the requested grid (``survives``), until ``max(max_try * num, 5)`` are kept; they
   are shuffled;
4. the sampler walks through the candidates (:class:`MaskCandidateQueue`), each mask augmented: a sample that
   fails the quality check is dropped and the **next mask** is used, unless the remaining candidates are just
   enough for the samples still missing (then it is kept, marked failed). At most ``max(max_try * num, 5)``
   masks are tried (the attempt limit; the official exact-match path has no limit).

Deviation (ours): when the database holds fewer suitable masks than requested samples, masks are reused (each
with its own augmentation and noise) instead of the official error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from torch.utils.data import IterableDataset

from common.transforms.maisi import BODY_LABEL, MAISI_LABELS, TUMOR_LABELS, to_maisi_label, totalsegmentator_to_maisi_lut

__all__ = [
    "load_mask_db",
    "find_masks",
    "ensure_mask_folder",
    "MaskCandidateQueue",
    "build_mask_db",
    "mask_db_entry",
    "BODY_REGIONS",
]

#: official body-region names -> index (head, chest/thorax, abdomen, pelvis/lower)
BODY_REGIONS = {"head": 0, "chest": 1, "thorax": 1, "chest/thorax": 1, "abdomen": 2, "pelvis": 3, "lower": 3,
                "pelvis/lower": 3}


def load_mask_db(db_path: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Read a mask database; file names become absolute: relative ones are taken from ``mask_dir`` (the unzipped
    official mask folder) when given, else from the JSON's folder."""
    db_path = Path(db_path)
    try:
        entries = json.loads(db_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{db_path}: not a readable JSON mask database ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{db_path}: a mask database is a non-empty JSON list")
    base = Path(mask_dir) if mask_dir else db_path.parent
    out = []
    for e in entries:
        e = dict(e)
        for key in ("pseudo_label_filename", "label_filename"):
            if key in e:
                name = Path(e[key])
                e[key] = str(name if name.is_absolute() else Path(os.path.normpath(base / name)))
        out.append(e)
    return out


def ensure_mask_folder(
    mask_dir: str | os.PathLike, zip_path: str | os.PathLike | None = None, large_files: str | os.PathLike | None = None,
    key: str = "mask_db_dir",
) -> Path:
    """The official mask folder, unzipped from ``zip_path`` (default ``<mask_dir>.zip``) on first use.

    The archive is checked against its ``large_files.yml`` entry first (when the bundle lists one with a hash),
    extracted into a hidden temporary folder beside ``mask_dir`` and renamed into place only when complete, so an
    interrupted run never leaves a half-written folder (the next run extracts again). Member names that would
    leave the folder (absolute or ``..``) are refused.
    """
    from common.networks.maisi import verify_checkpoint_hash
    from common.utils.errors import InputNotFoundError, InvalidInputError

    mask_dir = Path(mask_dir)
    if mask_dir.is_dir():
        return mask_dir
    zip_path = Path(zip_path) if zip_path else mask_dir.with_name(mask_dir.name + ".zip")
    if not zip_path.is_file():
        raise InputNotFoundError(
            f"mask folder '{mask_dir}' (config key '{key}') does not exist and neither does its archive '{zip_path}'; "
            "download the official mask database (large_files.yml, docs/README.md)"
        )
    verify_checkpoint_hash(zip_path, large_files=large_files, what="mask archive")
    mask_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mask_dir.name}.partial-", dir=mask_dir.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for name in zf.namelist():
                    target = os.path.normpath(tmp / name)
                    if Path(name).is_absolute() or not target.startswith(str(tmp) + os.sep):
                        raise InvalidInputError(f"mask archive '{zip_path}' has a member '{name}' outside its folder")
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InvalidInputError(f"mask archive '{zip_path}' cannot be unzipped ({e}); download it again") from e
        inner = tmp / mask_dir.name  # the official archive holds one top-level folder named like the mask folder
        src = inner if inner.is_dir() and len(list(tmp.iterdir())) == 1 else tmp
        try:
            os.rename(src, mask_dir)
        except OSError:
            if not mask_dir.is_dir():  # not a concurrent extraction that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return mask_dir


def _anatomy_ids(anatomy_list: Sequence[str | int]) -> list[int]:
    ids = []
    for a in anatomy_list:
        if isinstance(a, str):
            if a not in MAISI_LABELS:
                raise ValueError(f"unknown anatomy {a!r}")
            ids.append(MAISI_LABELS[a])
        else:
            ids.append(int(a))
    return ids


def _region_ids(body_region: Sequence[str] | str | None) -> list[int]:
    regions = [body_region] if isinstance(body_region, str) else list(body_region or [])
    bad = [r for r in regions if str(r).lower() not in BODY_REGIONS]
    if bad:
        raise ValueError(f"unknown body region(s) {bad}; choose from {sorted(BODY_REGIONS)}")
    return [BODY_REGIONS[str(r).lower()] for r in regions]


def _item(e: Mapping[str, Any], exact: bool) -> dict[str, Any]:
    out = {"label": e["pseudo_label_filename"], "spacing": list(e["spacing"]), "dim": list(e["dim"]),
           "label_list": list(e["label_list"]), "exact_match": exact, "augment": True}
    for k in ("top_region_index", "bottom_region_index"):
        if k in e:
            out[k] = list(e[k])
    return out


def find_masks(
    db: str | os.PathLike | Sequence[Mapping[str, Any]],
    anatomy_list: Sequence[str | int],
    spacing: Sequence[float],
    output_size: Sequence[int],
    num: int = 1,
    seed: int = 0,
    body_region: Sequence[str] | str | None = None,
    mask_dir: str | os.PathLike | None = None,
    max_try: int = 2,
    survives: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Candidate masks in the order the sampler tries them (module docstring, steps 1-3): dataset items
    ``{"label": path, "spacing", "dim", "label_list", "exact_match", "augment", [region indices]}``, at least
    ``num`` of them (masks are repeated when the database has fewer).

    Args:
        survives: ``item -> bool``, whether every requested label is still present after the mask is resampled to
            the requested grid (checked on the closest-match path only, as in the official code); ``None`` = yes.
        max_try: the official ``max_try_time``: ``max(max_try * num, 5)`` closest candidates at most.

    Raises ``ValueError`` when no mask qualifies.
    """
    entries = load_mask_db(db, mask_dir) if isinstance(db, (str, os.PathLike)) else [dict(e) for e in db]
    wanted = set(_anatomy_ids(anatomy_list))
    regions = _region_ids(body_region)
    target_dim = [int(s) for s in output_size]
    target_spc = [float(s) for s in spacing]
    rng = np.random.default_rng(seed)
    candidates = []
    for e in entries:
        labels = {int(v) for v in e["label_list"]}
        if not wanted <= labels:
            continue
        if any(t in labels and t not in wanted for t in TUMOR_LABELS):
            continue
        if regions and "top_region_index" in e and "bottom_region_index" in e:
            top = int(np.flatnonzero(e["top_region_index"])[0])
            bottom = int(np.flatnonzero(e["bottom_region_index"])[0])
            if any(r < top or r > bottom for r in regions):
                continue
        candidates.append(e)
    if not candidates:
        raise ValueError(f"no mask in the database contains all of {sorted(wanted)} (tumour-free unless requested"
                         + (f", covering body region(s) {list(body_region)}" if regions else "") + ")")
    limit = max(int(max_try) * int(num), 5)
    exact = [e for e in candidates if [int(d) for d in e["dim"]] == target_dim
             and [float(s) for s in e["spacing"]] == target_spc]
    if len(exact) >= num:
        order = rng.permutation(len(exact))
        chosen = [_item(exact[i], True) for i in order[:limit]]
    else:
        scored = []
        for e in candidates:
            dim, spc = np.asarray(e["dim"], dtype=float), np.asarray(e["spacing"], dtype=float)
            if np.any(np.abs(dim) < np.asarray(target_dim) - 64):
                continue  # would be upsampled too much
            diff = (np.abs(np.abs(dim * spc) - np.asarray(target_dim) * np.asarray(target_spc)) / 10).sum()
            diff += (np.abs(np.abs(dim) - np.asarray(target_dim)) / 100).sum() + np.abs(np.abs(spc) - target_spc).sum()
            scored.append((float(diff), e))
        scored.sort(key=lambda s: s[0])  # stable: database order on ties
        chosen = []
        for _, e in scored:
            item = _item(e, False)
            if survives is None or survives(item):
                chosen.append(item)
            if len(chosen) >= limit:
                break
        if not chosen:
            raise ValueError(
                f"no mask in the database keeps all of {sorted(wanted)} on a {target_dim} grid at {target_spc} mm "
                "(masks smaller than output_size - 64 voxels are not upsampled); change output_size or spacing"
            )
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    while len(chosen) < num:  # ours: reuse masks (each gets its own augmentation and noise)
        chosen += [dict(c) for c in chosen[: num - len(chosen)]]
    return chosen


class MaskCandidateQueue(IterableDataset):
    """The masks a sampler walks through until ``num`` samples are kept (official ``sample_multiple_images``).

    Iterating yields ``transform(item)`` for one candidate after the other while fewer than ``num`` samples have
    been kept; after each sample the sampler calls :meth:`decide` with its quality-check result. A sample is kept
    when it passed or when the candidates left (this one included) are no more than the samples still missing.
    With ``len(data) == num`` (a user mask repeated, generated masks) every sample is kept.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], num: int, transform: Callable | None = None) -> None:
        super().__init__()
        self.data = [dict(d) for d in data]
        self.num = int(num)
        self.transform = transform
        self.kept = 0
        self.tried = 0
        self.decisions: list[bool] = []

    def __iter__(self) -> Iterator[Any]:
        self.kept, self.tried, self.decisions = 0, 0, []
        for item in self.data:
            if self.kept >= self.num:
                return
            self.tried += 1
            yield self.transform(dict(item)) if self.transform is not None else dict(item)

    def decide(self, passed: bool) -> bool:
        """Keep the current sample? (``passed``: its quality check passed or was skipped.)"""
        remaining = len(self.data) - self.tried + 1
        keep = bool(passed) or (self.num - self.kept) >= remaining
        self.kept += int(keep)
        self.decisions.append(keep)
        return keep


def mask_db_entry(label: np.ndarray, affine: np.ndarray, filename: str) -> dict[str, Any]:
    """Database entry of a MAISI label array saved as ``filename`` (relative to the database JSON)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return {
        "pseudo_label_filename": filename,
        "spacing": [round(float(s), 6) for s in spacing],
        "dim": [int(s) for s in label.shape],
        "label_list": sorted(int(v) for v in np.unique(label) if v > 0),
    }


def build_mask_db(
    out_dir: str | os.PathLike,
    ct_path: str | os.PathLike,
    total_label_path: str | os.PathLike,
    class_map: Mapping[int, str],
    crops: int = 3,
) -> Path:
    """Small database from one CT and its TotalSegmentator labels (the demo scan): the full MAISI mask plus
    ``crops - 1`` axial sub-ranges of it (different fields of view and anatomy lists). Returns the JSON path.

    Labels are mapped by name to MAISI ids; body (200) is the CT's body mask where no organ is labelled.
    """
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    ct = nib.load(str(ct_path))
    seg = nib.load(str(total_label_path))
    if not np.allclose(ct.affine, seg.affine, atol=1e-4) or ct.shape != seg.shape:
        raise ValueError("the CT and its label map are not on the same grid")
    label = to_maisi_label(np.asarray(seg.dataobj), totalsegmentator_to_maisi_lut(class_map), np.asarray(ct.dataobj))
    entries = []
    z = label.shape[2]
    ranges = [(0, z)] + [(i * z // (crops + 1), (i + 2) * z // (crops + 1)) for i in range(crops - 1)]
    for k, (z0, z1) in enumerate(ranges):
        part = np.ascontiguousarray(label[:, :, z0:z1])
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([0, 0, z0]) + ct.affine[:3, 3]
        name = f"masks/mask_{k:03d}.nii.gz"
        img = nib.Nifti1Image(part.astype(np.uint8), affine)
        img.set_data_dtype(np.uint8)
        tmp = out_dir / (name + ".tmp.nii.gz")
        nib.save(img, str(tmp))
        os.replace(tmp, out_dir / name)
        entries.append(mask_db_entry(part, affine, name))
    if not any(BODY_LABEL in e["label_list"] for e in entries):
        raise ValueError("no body voxels found: is the CT in HU?")
    db = out_dir / "mask_db.json"
    tmp = db.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, db)
    return db
