"""Decathlon-style datalists for the public datasets' folder layouts, with leak-free splits.

Splits are made by subject, never by volume or slice: subject ids are sorted, permuted with
``numpy.random.default_rng(seed).permutation`` (seed 0 by default) and cut into
``train = floor(f_train n)``, ``val = round(f_val n)``, ``test = rest`` (the rule of the ALDM
translation spec, section 5: 1000 / 63 / 188 for BraTS 2021's 1251 subjects). The three lists are
checked for zero overlap, and a datalist is written once: an existing file is never overwritten
unless ``overwrite=True``, so a split cannot silently change under a trained model.

Paths in the JSON are relative to the JSON's folder (``os.path.relpath``, which may contain
``..``), so ``monai.data.load_decathlon_datalist(json, base_dir=<json folder>)`` resolves them.

Layouts:

- BraTS 2021 (RSNA-ASNR-MICCAI Task 1):
  ``BraTS2021_Training_Data/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``;
  the official validation cases have the same layout without ``seg``.
- IXI (brain-development.org, CC BY-SA 3.0): ``IXI<id>-<site>-<n>-{T1,T2,PD}.nii.gz`` anywhere
  under the root (e.g. the unpacked ``IXI-T1.tar``, ``IXI-T2.tar``, ``IXI-PD.tar``); only
  subjects with all three contrasts are used, and T1 is rigidly registered onto the T2 grid
  (:func:`common.data.registration.rigid_register`) because T2 and PD come from one dual-echo
  acquisition while T1 was acquired separately. The builder stops there: nothing here or in the
  bundles resamples IXI to 1 mm, corrects its bias field (N4) or masks the head. The bundles take
  the volumes on the T2/PD grid as acquired (0.94 x 0.94 x 1.2 mm), reorient them to RAS and crop
  or pad them to their training size; without a ``mask`` entry, evaluation masks are
  ``source > 0 or target > 0``, which in unmasked IXI is most of the field of view.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import atomic_write

__all__ = [
    "BRATS_MODALITIES",
    "IXI_MODALITIES",
    "split_subjects",
    "build_brats2021_datalist",
    "build_ixi_datalist",
]

BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
IXI_MODALITIES: tuple[str, ...] = ("t1", "t2", "pd")

_SPLIT_RULE = "sorted ids, numpy default_rng(seed).permutation; train floor(f n), val round(f n), test rest"
_BRATS_ID = re.compile(r"^BraTS2021_\d{5}$")
_IXI_FILE = re.compile(r"^IXI(?P<num>\d+)-(?P<site>[A-Za-z]+)-(?P<n>\d+)-(?P<contrast>T1|T2|PD)\.nii\.gz$")


def split_subjects(
    ids: Sequence[str], fractions: tuple[float, float] = (0.8, 0.05), seed: int = 0
) -> dict[str, list[str]]:
    """Split subject ids into ``training``/``validation``/``test`` with no overlap.

    Args:
        ids: unique subject ids (any order: they are sorted first, so the split does not depend on
            the file-system listing order).
        fractions: ``(train, val)``; train is ``floor(train n)``, val is ``round(val n)`` (Python's
            round half to even), test the rest.
        seed: seed of the permutation.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each list sorted.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids are not unique")
    f_train, f_val = fractions
    if not (0 < f_train <= 1 and 0 <= f_val and f_train + f_val <= 1):
        raise ValueError(f"invalid split fractions {fractions}: need 0 < train, 0 <= val, train + val <= 1")
    n = len(ids)
    n_train = math.floor(f_train * n)
    n_val = round(f_val * n)
    order = np.random.default_rng(seed).permutation(n)
    perm = [ids[i] for i in order]
    split = {
        "training": sorted(perm[:n_train]),
        "validation": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }
    _check_disjoint(split)
    return split


def _check_disjoint(split: dict[str, list[str]]) -> None:
    names = list(split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = set(split[a]) & set(split[b])
            if common:
                raise InvalidInputError(f"subject leak between '{a}' and '{b}': {sorted(common)[:5]}")


def refuse_existing_datalist(out_json: Path, overwrite: bool) -> None:
    """A datalist's split belongs to the models trained on it: keep an existing one unless ``overwrite``."""
    if out_json.exists() and not overwrite:
        raise OutputExistsError(
            f"datalist '{out_json}' already exists; its split is kept so that trained models stay valid. "
            "Pass overwrite=True to replace it."
        )


def write_json_atomic(path: Path, obj: object) -> None:
    """``obj`` as indented JSON, written to a temporary file and renamed into place."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


# --------------------------------------------------------------------------------------------
# BraTS 2021


def _find_dir(root: Path, name: str, contains: str) -> Path:
    """``root/name`` if it exists, ``root`` itself if it already is that folder, else the single
    sub-folder whose name contains ``contains``."""
    if (root / name).is_dir():
        return root / name
    if root.name == name or any(_BRATS_ID.match(p.name) for p in root.iterdir() if p.is_dir()):
        return root
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and contains.lower() in p.name.lower())
    if len(candidates) == 1:
        return candidates[0]
    raise InputNotFoundError(
        f"no '{name}' folder (or one folder whose name contains '{contains}') with BraTS2021_XXXXX subjects in '{root}'"
    )


def _brats_subjects(folder: Path, keys: tuple[str, ...], base: Path) -> list[dict[str, str]]:
    subjects = sorted(p for p in folder.iterdir() if p.is_dir() and _BRATS_ID.match(p.name))
    if not subjects:
        raise InputNotFoundError(f"no BraTS2021_XXXXX subject folders in '{folder}'")
    entries = []
    for subj in subjects:
        entry = {"id": subj.name}
        for key in keys:
            f = subj / f"{subj.name}_{key}.nii.gz"
            if not f.is_file():
                raise InputNotFoundError(f"missing {key} file '{f}' of subject {subj.name}")
            entry[key] = _rel(f, base)
        entries.append(entry)
    return entries


def build_brats2021_datalist(
    root: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    test_source: str = "split",
    validation_dir: str | os.PathLike | None = None,
    fractions: tuple[float, float] = (0.8, 0.05),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Datalist of BraTS 2021 (Task 1) for translation/segmentation bundles.

    Args:
        root: folder holding ``BraTS2021_Training_Data`` (or that folder itself).
        out_json: the datalist to write; paths inside are relative to its folder.
        test_source: ``"split"`` (test = the rest of the training data after train/val) or
            ``"validation_data"`` (test = the official validation cases, which have no ``seg``;
            train/val stay the same as with ``"split"``, and the held-out training subjects are
            listed under ``"test_internal"`` so none is silently dropped).
        validation_dir: folder of the official validation cases; default: the single folder under
            ``root`` whose name contains ``ValidationData``.
        fractions: ``(train, val)`` fractions, see :func:`split_subjects`.
        seed: split seed.
        overwrite: replace an existing ``out_json`` (default: refuse).

    Returns:
        ``out_json``. Entries: ``{"id", "t1", "t1ce", "t2", "flair", "seg"}`` (no ``seg`` for the
        official validation cases).
    """
    root, out_json = Path(root), Path(out_json)
    if test_source not in ("split", "validation_data"):
        raise InvalidInputError(f"test_source must be 'split' or 'validation_data', got '{test_source}'")
    refuse_existing_datalist(out_json, overwrite)
    if not root.is_dir():
        raise InputNotFoundError(f"BraTS root folder '{root}' does not exist")
    base = out_json.parent
    train_dir = _find_dir(root, "BraTS2021_Training_Data", "Training")
    entries = {e["id"]: e for e in _brats_subjects(train_dir, (*BRATS_MODALITIES, "seg"), base)}
    split = split_subjects(list(entries), fractions, seed)
    datalist: dict[str, object] = {
        "name": "BraTS2021",
        "description": "BraTS 2021 Task 1 (RSNA-ASNR-MICCAI), 240x240x155 at 1 mm, co-registered, skull-stripped",
        "licence": "BraTS 2021 data use agreement (Synapse); cite Baid et al. arXiv:2107.02314",
        "modalities": list(BRATS_MODALITIES),
        "split": {
            "rule": _SPLIT_RULE,
            "fractions": list(fractions),
            "seed": seed,
            "test_source": test_source,
        },
        "training": [entries[i] for i in split["training"]],
        "validation": [entries[i] for i in split["validation"]],
    }
    if test_source == "split":
        datalist["test"] = [entries[i] for i in split["test"]]
    else:
        if validation_dir is not None:
            val_dir = Path(validation_dir)
        else:
            val_dir = _find_dir(root, "BraTS2021_ValidationData", "ValidationData")
            if val_dir == train_dir:
                raise InputNotFoundError(f"no official validation-data folder found in '{root}'; pass validation_dir")
        external = _brats_subjects(val_dir, BRATS_MODALITIES, base)
        leak = {e["id"] for e in external} & set(entries)
        if leak:
            raise InvalidInputError(f"official validation ids also in the training data: {sorted(leak)[:5]}")
        datalist["test"] = external
        datalist["test_internal"] = [entries[i] for i in split["test"]]
    lists = ("training", "validation", "test", "test_internal")
    _check_disjoint({k: [e["id"] for e in datalist[k]] for k in lists if k in datalist})  # type: ignore[union-attr]
    write_json_atomic(out_json, datalist)
    return out_json


# --------------------------------------------------------------------------------------------
# IXI


def _scan_ixi(root: Path) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]], dict[str, str]]:
    found: dict[str, dict[str, Path]] = {}
    prefix: dict[str, str] = {}
    for f in sorted(root.rglob("IXI*.nii.gz")):
        m = _IXI_FILE.match(f.name)
        if not m:
            continue
        sid = f"IXI{m['num']}"
        key = f"IXI{m['num']}-{m['site']}-{m['n']}"
        if prefix.setdefault(sid, key) != key:
            raise InvalidInputError(f"subject {sid} appears as both '{prefix[sid]}' and '{key}' under '{root}'")
        contrast = m["contrast"].lower()
        if contrast in found.setdefault(sid, {}):
            raise InvalidInputError(f"two {m['contrast']} files for {key}: '{found[sid][contrast]}' and '{f}'")
        found[sid][contrast] = f
    complete = {s: c for s, c in found.items() if all(k in c for k in IXI_MODALITIES)}
    incomplete = {s: sorted(k for k in IXI_MODALITIES if k not in c) for s, c in found.items() if s not in complete}
    return complete, incomplete, prefix


def build_ixi_datalist(
    root: str | os.PathLike,
    out_json: str | os.PathLike,
    register_t1: bool = True,
    *,
    registered_dir: str | os.PathLike | None = None,
    fractions: tuple[float, float] = (0.8, 0.05),
    seed: int = 0,
    overwrite: bool = False,
    registration_kwargs: dict | None = None,
) -> Path:
    """Datalist of IXI subjects with T1, T2 and PD.

    Args:
        root: folder searched recursively for ``IXI<id>-<site>-<n>-{T1,T2,PD}.nii.gz``.
        out_json: the datalist to write; paths inside are relative to its folder.
        register_t1: rigidly register T1 onto T2 and list the registered T1 (on the T2 grid);
            ``False`` lists the raw T1 (only if registration is done elsewhere).
        registered_dir: where registered T1 go (``<id>/t1_to_t2.nii.gz``); default
            ``<out_json folder>/ixi_registered``. Existing outputs are reused (they are written
            atomically, so an existing file is complete), which makes an interrupted build cheap
            to resume.
        fractions: ``(train, val)``; ``(0.8, 0.05)`` is the ALDM rule (same as BraTS), the IVAN
            fusion bundle uses ``(0.8, 0.1)`` (80/10/10).
        seed: split seed.
        overwrite: replace an existing ``out_json`` (default: refuse).
        registration_kwargs: extra arguments of :func:`~common.data.registration.rigid_register`.

    Returns:
        ``out_json``. Entries ``{"id": "IXI002", "site", "t1", "t2", "pd"}``; subjects lacking a
        contrast are listed under ``"excluded"`` with what they lack.
    """
    root, out_json = Path(root), Path(out_json)
    refuse_existing_datalist(out_json, overwrite)
    if not root.is_dir():
        raise InputNotFoundError(f"IXI root folder '{root}' does not exist")
    complete, incomplete, prefix = _scan_ixi(root)
    if not complete:
        detail = f" ({len(incomplete)} subjects lack a contrast)" if incomplete else ""
        raise InputNotFoundError(
            "no IXI subject with all of T1, T2 and PD "
            f"(files IXI<id>-<site>-<n>-{{T1,T2,PD}}.nii.gz) in '{root}'{detail}"
        )
    base = out_json.parent
    reg_root = Path(registered_dir) if registered_dir is not None else base / "ixi_registered"
    entries: dict[str, dict[str, str]] = {}
    for sid in sorted(complete):
        files = complete[sid]
        t1 = files["t1"]
        if register_t1:
            from common.data.registration import rigid_register  # ITK loads slowly: only when needed

            t1 = reg_root / sid / "t1_to_t2.nii.gz"
            if not t1.is_file():
                rigid_register(files["t1"], files["t2"], t1, **(registration_kwargs or {}))
        entries[sid] = {
            "id": sid,
            "site": prefix[sid].split("-")[1],
            "t1": _rel(t1, base),
            "t2": _rel(files["t2"], base),
            "pd": _rel(files["pd"], base),
        }
    split = split_subjects(list(entries), fractions, seed)
    datalist = {
        "name": "IXI",
        "description": "IXI T1/T2/PD (Guys, HH, IOP); T1 rigidly registered onto the T2 grid"
        if register_t1
        else "IXI T1/T2/PD (Guys, HH, IOP); T1 not registered",
        "licence": "CC BY-SA 3.0 (IXI, brain-development.org)",
        "modalities": list(IXI_MODALITIES),
        "t1_registered_to_t2": bool(register_t1),
        "split": {"rule": _SPLIT_RULE, "fractions": list(fractions), "seed": seed},
        "training": [entries[i] for i in split["training"]],
        "validation": [entries[i] for i in split["validation"]],
        "test": [entries[i] for i in split["test"]],
        "excluded": {sid: {"missing": missing} for sid, missing in sorted(incomplete.items())},
    }
    write_json_atomic(out_json, datalist)
    return out_json
