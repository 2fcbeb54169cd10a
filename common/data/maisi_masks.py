"""MAISI mask database: format, retrieval of candidate masks and a small database built from the demo CT.

Format (the official ``candidate_masks_flexible_size_and_spacing_{3000,4000}.json`` of MAISI, so the official
database can be used as is): a JSON list, one entry per label mask::

    {"pseudo_label_filename": "masks/ct_000_label.nii.gz",   # relative to the JSON's folder (or absolute)
     "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256],    # of that file
     "label_list": [1, 3, 5, ..., 200],                      # MAISI ids present
     "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 0, 1]}   # optional (DDPM)

Retrieval (spec ``maisi_ct`` section 4.2b): keep masks that contain every requested anatomy and no tumour
unless one is requested, then rank by ``|FOV - FOV_target| / 10 + |dim - dim_target| / 100 +
|spacing - spacing_target|`` (summed over axes; exact size and spacing matches score 0) and draw the requested
number from the best ``max(2n, 5)`` with a seeded generator. The chosen masks are resampled to the requested
grid by the inference preprocessing (nearest neighbour + pad/crop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.transforms.maisi import BODY_LABEL, MAISI_LABELS, TUMOR_LABELS, to_maisi_label, totalsegmentator_to_maisi_lut

__all__ = ["load_mask_db", "find_masks", "build_mask_db", "mask_db_entry"]


def load_mask_db(db_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a mask database; file names become absolute (relative ones are taken from the JSON's folder)."""
    db_path = Path(db_path)
    entries = json.loads(db_path.read_text())
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{db_path}: a mask database is a non-empty JSON list")
    out = []
    for e in entries:
        e = dict(e)
        name = Path(e["pseudo_label_filename"])
        e["pseudo_label_filename"] = str(name if name.is_absolute() else db_path.parent / name)
        out.append(e)
    return out


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


def find_masks(
    db: str | os.PathLike | Sequence[Mapping[str, Any]],
    anatomy_list: Sequence[str | int],
    spacing: Sequence[float],
    output_size: Sequence[int],
    num: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``num`` dataset items ``{"label": path, "spacing", "dim", "label_list"}`` drawn from the best candidates.

    Raises ``ValueError`` when no mask contains all requested anatomies.
    """
    entries = load_mask_db(db) if isinstance(db, (str, os.PathLike)) else [dict(e) for e in db]
    wanted = set(_anatomy_ids(anatomy_list))
    want_tumor = bool(wanted & set(TUMOR_LABELS))
    target_dim = np.asarray(output_size, dtype=float)
    target_spc = np.asarray(spacing, dtype=float)
    scored = []
    for e in entries:
        labels = {int(v) for v in e["label_list"]}
        if not wanted <= labels:
            continue
        if not want_tumor and labels & set(TUMOR_LABELS):
            continue
        dim, spc = np.asarray(e["dim"], dtype=float), np.asarray(e["spacing"], dtype=float)
        score = np.abs(dim * spc - target_dim * target_spc).sum() / 10 + np.abs(dim - target_dim).sum() / 100
        score += np.abs(spc - target_spc).sum()
        scored.append((float(score), e["pseudo_label_filename"], e))
    if not scored:
        raise ValueError(f"no mask in the database contains all of {sorted(wanted)} (tumour-free unless requested)")
    scored.sort(key=lambda s: (s[0], s[1]))
    best = [s[2] for s in scored[: max(2 * num, 5)]]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(best), size=num, replace=len(best) < num)
    return [
        {"label": best[i]["pseudo_label_filename"], "spacing": list(best[i]["spacing"]), "dim": list(best[i]["dim"]),
         "label_list": list(best[i]["label_list"])}
        for i in picks
    ]


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
