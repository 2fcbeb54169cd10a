"""Decathlon-style datalists for the public segmentation datasets of the ``diffseg`` bundle.

Each builder reads a dataset as it is distributed, applies the split of the ``diffseg`` method
spec (§5) and writes ``{"training", "validation", "test", "labels", ...}`` with paths relative to
the dataset folder, so that ``monai.data.load_decathlon_datalist(json, data_list_key=...,
base_dir=dataset_dir)`` finds the files. Nothing is downloaded; see the bundle's model card for
where each dataset comes from.

* AMOS 2022 (Ji et al., NeurIPS 2022 Datasets and Benchmarks; zenodo 7155725 / 7262581): CT only
  (ids <= 500); train = the CT cases of ``training`` in ``dataset.json``; the CT cases of
  ``validation`` in file order: first 10 % validation, the rest test (200 / 10 / 90).
* Male pelvic MR (Li et al., "Prototypical few-shot segmentation for cross-institution male pelvic
  structures with spatial registration", MedIA 2023; zenodo 7013610): ``<uid>_img.nii``,
  ``<uid>_mask.nii`` and ``institution.txt``; per institution in file order: validation = the first
  2, train = ``uids[2 : int(0.75 n) - 2]``, test = the rest (411 / 14 / 164 for the 589 volumes),
  as the official ImgX-DiffSeg preprocessing.
* Medical Segmentation Decathlon tasks (Antonelli et al., Nat. Commun. 13:4128, 2022): the
  labelled ``training`` cases, sorted by id and permuted with a seeded generator, are split
  80 / 10 / 10 (ours: MSD's own test images have no labels).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.datalists import refuse_existing_datalist, write_json_atomic
from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = [
    "AMOS_LABELS",
    "PELVIC_LABELS",
    "build_amos_datalist",
    "build_pelvic_datalist",
    "build_msd_datalist",
    "median_spacing",
    "write_datalist",
]

#: AMOS 2022 classes (``dataset.json`` of amos22).
AMOS_LABELS: dict[str, str] = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior vena cava",
    "10": "pancreas",
    "11": "right adrenal gland",
    "12": "left adrenal gland",
    "13": "duodenum",
    "14": "bladder",
    "15": "prostate/uterus",
}

#: Male pelvic MR classes (zenodo 7013610).
PELVIC_LABELS: dict[str, str] = {
    "0": "background",
    "1": "bladder",
    "2": "bone",
    "3": "obturator internus",
    "4": "transition zone",
    "5": "central gland",
    "6": "rectum",
    "7": "seminal vesicle",
    "8": "neurovascular bundle",
}


def _rel(path: str) -> str:
    """Dataset-relative path without a leading ``./``."""
    return path[2:] if path.startswith("./") else path


def _case_id(path: str) -> str:
    return re.sub(r"(\.nii(\.gz)?)$", "", Path(path).name)


def write_datalist(out_file: str | os.PathLike, datalist: dict, overwrite: bool = False) -> Path:
    """Write ``datalist`` as JSON (via a temporary file, so a crash never leaves half a file). An
    existing file is kept (its split belongs to the models trained on it) unless ``overwrite``."""
    out = Path(out_file)
    refuse_existing_datalist(out, overwrite)
    write_json_atomic(out, datalist)
    return out


def _dataset_json(folder: Path, what: str, required: Sequence[str] = ("training",)) -> dict:
    """``<folder>/dataset.json`` with one clear error for a missing folder/file or a wrong layout."""
    if not folder.is_dir():
        raise InputNotFoundError(f"{what} folder '{folder}' does not exist")
    path = folder / "dataset.json"
    if not path.is_file():
        raise InputNotFoundError(f"'{path}' does not exist: is '{folder}' the extracted {what} folder?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"'{path}' is not valid JSON: {e}") from e
    for key in required:
        if not isinstance(meta.get(key), list):
            raise InvalidInputError(f"'{path}' has no '{key}' list (keys: {sorted(meta)})")
    return meta


def _check_cases(folder: Path, cases: list[dict], source: Path) -> None:
    """Every image/label listed must exist under ``folder`` (the first few missing are named)."""
    missing = [c[k] for c in cases for k in ("image", "label") if k in c and not (folder / c[k]).exists()]
    if missing:
        raise InputNotFoundError(
            f"{len(missing)} files listed in '{source}' do not exist under '{folder}' (e.g. {missing[:3]})"
        )


def build_amos_datalist(
    root: str | os.PathLike, out_file: str | os.PathLike | None = None, valid_fraction: float = 0.1, overwrite: bool = False
) -> Path:
    """AMOS 2022 CT datalist from ``<root>/dataset.json`` (root = the ``amos22`` folder).

    Returns the path of the written JSON (default ``<root>/datalist_diffseg.json``; an existing one is
    kept unless ``overwrite``). Every listed CT image and label must exist.
    """
    root = Path(root)
    meta = _dataset_json(root, "AMOS 2022", required=("training", "validation"))

    def ct_cases(entries: list[dict]) -> list[dict]:
        out = []
        for e in entries:
            cid = _case_id(e["image"])
            if int(cid.split("_")[-1]) <= 500:  # ids > 500 are MR
                out.append({"id": cid, "image": _rel(e["image"]), "label": _rel(e["label"])})
        return out

    train = ct_cases(meta["training"])
    val_all = ct_cases(meta["validation"])
    _check_cases(root, train + val_all, root / "dataset.json")
    n_valid = int(round(valid_fraction * len(val_all)))
    labels = {str(k): v for k, v in meta.get("labels", AMOS_LABELS).items()}
    datalist = {
        "name": "amos22_ct",
        "modality": {"0": "CT"},
        "labels": labels,
        "training": train,
        "validation": val_all[:n_valid],
        "test": val_all[n_valid:],
    }
    return write_datalist(out_file or root / "datalist_diffseg.json", datalist, overwrite=overwrite)


def _read_institutions(path: Path) -> list[tuple[str, str]]:
    """``(uid, institution)`` pairs of ``institution.txt`` in file order (comma or whitespace separated)."""
    pairs = []
    for line in path.read_text().splitlines():
        parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
        if len(parts) < 2 or parts[0].lower() in ("key", "uid", "id"):
            continue
        pairs.append((parts[0], parts[1]))
    return pairs


def build_pelvic_datalist(root: str | os.PathLike, out_file: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Male pelvic MR datalist from the extracted ``data.zip`` (``<uid>_img.nii``, ``<uid>_mask.nii``, ``institution.txt``)."""
    root = Path(root)
    if not (root / "institution.txt").is_file():
        raise InputNotFoundError(f"'{root / 'institution.txt'}' does not exist: is '{root}' the extracted data.zip folder?")
    by_inst: dict[str, list[str]] = {}
    for uid, inst in _read_institutions(root / "institution.txt"):
        by_inst.setdefault(inst, []).append(uid)
    split: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for inst, uids in by_inst.items():
        n = len(uids)
        parts = {"validation": uids[:2], "training": uids[2 : int(0.75 * n) - 2], "test": uids[max(int(0.75 * n) - 2, 2) :]}
        for key, chosen in parts.items():
            for uid in chosen:
                split[key].append({"id": uid, "image": f"{uid}_img.nii", "label": f"{uid}_mask.nii", "institution": inst})
    _check_cases(root, [c for part in split.values() for c in part], root / "institution.txt")
    datalist = {"name": "male_pelvic_mr", "modality": {"0": "T2w"}, "labels": dict(PELVIC_LABELS), **split}
    return write_datalist(out_file or root / "datalist_diffseg.json", datalist, overwrite=overwrite)


def build_msd_datalist(
    task_dir: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """MSD task datalist from ``<task_dir>/dataset.json``: seeded 80/10/10 split of the labelled cases
    (an existing datalist is kept unless ``overwrite``; every listed image and label must exist)."""
    task_dir = Path(task_dir)
    meta = _dataset_json(task_dir, "Medical Segmentation Decathlon task")
    if not isinstance(meta.get("labels"), dict):
        raise InvalidInputError(f"'{task_dir / 'dataset.json'}' has no 'labels' mapping")
    cases = sorted(
        ({"id": _case_id(e["image"]), "image": _rel(e["image"]), "label": _rel(e["label"])} for e in meta["training"]),
        key=lambda e: e["id"],
    )
    _check_cases(task_dir, cases, task_dir / "dataset.json")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_train = int(round(fractions[0] * len(cases)))
    n_val = int(round(fractions[1] * len(cases)))
    pick = [cases[i] for i in order]
    datalist = {
        "name": meta.get("name", task_dir.name),
        "modality": meta.get("modality", {}),
        "labels": {str(k): v for k, v in meta["labels"].items()},
        "training": pick[:n_train],
        "validation": pick[n_train : n_train + n_val],
        "test": pick[n_train + n_val :],
        "unlabelled_test": [{"image": _rel(p if isinstance(p, str) else p["image"])} for p in meta.get("test", [])],
    }
    return write_datalist(out_file or task_dir / "datalist_diffseg.json", datalist, overwrite=overwrite)


def median_spacing(dataset_dir: str | os.PathLike, datalist_file: str | os.PathLike, key: str = "training") -> list[float]:
    """Median voxel spacing (mm, per axis of the stored arrays) of the ``key`` images: the MSD target spacing."""
    import nibabel as nib

    entries = json.loads(Path(datalist_file).read_text())[key]
    zooms = [nib.load(str(Path(dataset_dir) / e["image"])).header.get_zooms()[:3] for e in entries]
    return [float(v) for v in np.median(np.asarray(zooms, dtype=np.float64), axis=0)]
