"""Build the real demo cohorts (Decathlon-style datalists) from the package-shipped images.

Three cohorts, each in its own folder under ``out_dir`` with paths relative to its JSON:

- ``brain_mri/datalist.json``: simulated multi-contrast subjects (T1w, T2w, PDw, FLAIR, and a
  CT-like image in HU under key ``ct`` for MR/CT fusion) for training/validation, made by deforming
  SPM's tissue priors and Neuromorphometrics structure labels (:mod:`common.data.deform`) and
  running the physics simulator (:mod:`common.data.mri_sim`); the ``test`` list holds the real
  SPM avg152 T1/T2/PD triple (with the CT-like image of the undeformed priors). The simulated
  subjects never contain its voxels; the simulator's structure-specific tissue values were
  calibrated on its mean contrast per structure (4 numbers per structure,
  :mod:`common.data.mri_sim_calibration`), which results on it must state.
- ``ct/datalist.json``: deformed copies, with intensity variation, of the TotalSegmentator
  example abdominal CT and its organ labels merged to :data:`CT_LABELS`; ``test`` holds the
  original CT.
- ``dwi/schemes.json``: dipy's real diffusion gradient tables and the real ``small_101D`` DWI.

Guarantees: every volume has the source affine (so the right spacing and orientation), images
are float32 and labels/masks uint8; the build is deterministic (same arguments give
byte-identical files: gzip headers carry no time stamp nor file name); every file is written to a
temporary name in its folder and renamed, the cohort is assembled in a temporary folder, and a
completion marker (written last, recording the arguments and a hash of the generating code) lets a
later call reuse a finished build and redo an interrupted or outdated one.

Licences: the brain cohort is derived from SPM12 files (GPL-2.0, Wellcome Centre for Human
Neuroimaging): build it locally, do not redistribute it. The TotalSegmentator example CT and
labels are Apache-2.0 (TotalSegmentator 2.18.0 source archive; Wasserthal et al., Radiology: AI
5(5):e230024, 2023). The dipy files are BSD-3-Clause.

Command line::

    python -m common.data.demo --out DIR [--what brain_mri ct dwi] [--n-train N] [--n-val N] [--seed S]
"""

from __future__ import annotations

import argparse
import ast
import functools
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.deform import DeformationParams, random_deformation
from common.data.fetch import demo_file, fetch_source
from common.data.mri_sim import (
    CONTRASTS,
    TISSUE_LABELS,
    apply_structures,
    brain_mask,
    ct_like,
    load_structure_labels,
    load_tissue_maps,
    normalise_percentile,
    quantise,
    simulate_subject,
    tissue_labels,
)
from common.utils.io import atomic_write

__all__ = [
    "CT_LABELS",
    "CT_CLASS_MERGE",
    "merge_total_labels",
    "total_class_names",
    "save_nifti",
    "build_brain_mri_demo",
    "build_ct_demo",
    "build_ct_framings",
    "CT_SLAB_SLICES",
    "build_brain_framings",
    "BRAIN_FRAMINGS",
    "BRAIN_SLAB_SLICES",
    "build_dwi_demo",
    "build_all",
]

#: Merged CT classes of the demo cohort.
CT_LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney",
    4: "bowel",
    5: "urinary_bladder",
    6: "bone",
}

#: Merged class id -> TotalSegmentator ``class_map["total"]`` ids (v2.18.0,
#: ``totalsegmentator/map_to_binary.py``). Chosen from the voxel counts of the example scan
#: (3 mm voxels): liver 41692; spleen 9668; kidneys 7134 + 5090; bowel = stomach 4836, small bowel
#: 19717, duodenum 2319, colon 59968; urinary bladder 17756; bone = sacrum, vertebrae, hips,
#: femurs, ribs, sternum, ... (about 85000). Everything else (muscles, vessels, pancreas 695,
#: gallbladder 1319, lungs, prostate, costal cartilage, ...) becomes background: too small for
#: tiny runs or not an organ of interest for the demos.
CT_CLASS_MERGE: dict[int, tuple[int, ...]] = {
    1: (5,),  # liver
    2: (1,),  # spleen
    3: (2, 3),  # kidney_right, kidney_left
    4: (6, 18, 19, 20),  # stomach, small_bowel, duodenum, colon
    5: (21,),  # urinary_bladder
    # sacrum, vertebrae S1..C1, humeri, scapulae, claviculae, femurs, hips, skull, ribs, sternum
    6: (25, *range(26, 51), *range(69, 79), 91, *range(92, 117)),
}

_CT_LUT = np.zeros(256, dtype=np.uint8)
for _merged, _ids in CT_CLASS_MERGE.items():
    _CT_LUT[list(_ids)] = _merged

# Brain: a few mm of global pose/size change and of local shape change at 2 mm voxels. CT: 3 mm
# voxels and a larger field of view, so a coarser control grid and larger displacements.
_BRAIN_DEFORM = DeformationParams(
    rotate_deg=6.0, scale=0.06, translate_mm=4.0, control_spacing_mm=40.0, displacement_mm=2.5
)
_CT_DEFORM = DeformationParams(
    rotate_deg=5.0, scale=0.05, translate_mm=6.0, control_spacing_mm=60.0, displacement_mm=4.0
)
# Distinct streams per cohort so brain subject i and CT subject i do not share random draws.
_BRAIN_STREAM, _CT_STREAM = 1, 2
_MARKER = ".complete.json"
_GZIP_LEVEL = 1  # the data are noisy floats: higher levels cost 2-7x the time for 5-10 % smaller files


@functools.lru_cache(maxsize=None)
def _source_dir(name: str) -> Path:
    """Verified source folder, once per process (verification re-hashes every member)."""
    return fetch_source(name)


def _src(key: str) -> Path:
    name, _, member = key.partition("/")
    return _source_dir(name) / member


def merge_total_labels(label_array: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator ``total`` label map (ids 0..117) to :data:`CT_LABELS` ids (uint8)."""
    arr = np.asarray(label_array)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label ids must lie in 0..255, got {arr.min()}..{arr.max()}")
    return _CT_LUT[arr.astype(np.intp)]


def total_class_names(root: str | os.PathLike | None = None) -> dict[int, str]:
    """TotalSegmentator's ``class_map["total"]`` read from its ``map_to_binary.py`` without
    importing the package (it is not a dependency): the file is parsed with :mod:`ast`."""
    tree = ast.parse(Path(demo_file("totalsegmentator/map_to_binary.py", root)).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)["total"].items()}
    raise ValueError("class_map not found in TotalSegmentator's map_to_binary.py")


# --------------------------------------------------------------------------------------------
# deterministic, atomic writing


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def _write_json(path: Path, obj: object) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type | np.dtype) -> Path:
    """Write a ``.nii.gz`` deterministically and atomically.

    The header carries ``affine`` as both qform and sform (code 1, scanner) and mm units, so
    ITK, nibabel and MONAI readers agree on the geometry. The gzip stream is written with
    ``mtime=0`` and no embedded file name, so identical arrays give identical bytes.
    """
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), np.asarray(affine, dtype=np.float64))
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    _atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=_GZIP_LEVEL, mtime=0))
    return path


def _code_hash() -> str:
    """Hash of the modules that generate the cohorts: a changed generator invalidates old builds."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("demo.py", "mri_sim.py", "deform.py", "brain_structure_tissues.json"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _build_cohort(
    out_dir: str | os.PathLike, name: str, json_name: str, args: dict, fill: Callable[[Path], None]
) -> Path:
    """Reuse ``<out_dir>/<name>`` if its marker matches ``args``; otherwise build it in a
    temporary sibling folder with ``fill`` and move it into place."""
    out_dir = Path(out_dir)
    final = out_dir / name
    marker = {"cohort": name, "args": args, "code": _code_hash()}
    if _marker_ok(final, marker):
        return final / json_name
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out_dir, name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial.{os.getpid()}.", dir=out_dir))
    work.chmod(0o755)  # mkdtemp makes it private; the cohort is ordinary data
    try:
        fill(work)
        _write_json(work / _MARKER, marker)  # last: only a finished build has it
        if final.exists():
            if _marker_ok(final, marker):  # another process finished the same build meanwhile
                shutil.rmtree(work)
                return final / json_name
            shutil.rmtree(final)  # interrupted or outdated build
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final / json_name


def _remove_dead_partials(out_dir: Path, name: str) -> None:
    """Delete temporary build folders left by killed builds (their process no longer exists);
    folders of builds still running, here or in another process, are left alone."""
    for folder in out_dir.glob(f".{name}.partial.*"):
        try:
            pid = int(folder.name.split(".")[3])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


def _marker_ok(folder: Path, marker: dict) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _split_ids(prefix: str, n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    ids = [f"{prefix}_{i:03d}" for i in range(n_train + n_val)]
    return ids[:n_train], ids[n_train:]


def _round_params(obj: object) -> object:
    """Floats rounded for the provenance JSON (stable text, readable)."""
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round_params(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# brain MRI


def build_brain_mri_demo(
    out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 2, seed: int = 0,
    noise: tuple[float, float] | None = None, extracerebral_jitter: float | None = None,
) -> Path:
    """Simulated multi-contrast brain cohort + the real avg152 triple as test set.

    Args:
        out_dir: parent folder; the cohort goes to ``<out_dir>/brain_mri``.
        n_train: simulated training subjects (``sim_000`` ...).
        n_val: simulated validation subjects (numbered after the training ones).
        seed: cohort seed; subject ``i`` uses the stream ``(seed, 1, i)``.
        noise: range of the Rician noise sigma (relative, see :func:`common.data.mri_sim.simulate_subject`);
            ``None``: the simulator's default range. ``(0, 0)`` gives noise-free subjects, closer to the
            population-average avg152 test images (an average of 152 scans has almost no noise); everything
            else about a subject (anatomy, tissue and sequence values, bias, point spread) stays as with the
            default, since the draws happen in the same order.
        extracerebral_jitter: relative range of the per-subject PD/T1/T2 of bone and soft tissue (scalp)
            (:func:`common.data.mri_sim.sample_tissues`); ``None``: the brain tissues' 3 %.

    Returns:
        Path of ``<out_dir>/brain_mri/datalist.json``. Entries: ``{"id", "t1", "t2", "pd",
        "flair", "mask"}`` for simulated subjects, ``{"id": "avg152", "t1", "t2", "pd", "mask"}``
        in ``test``; images float32 in [0, 1], masks uint8, 91x109x91 at 2 mm, SPM affine. Each
        subject folder also holds ``tissue.nii.gz`` (uint8 hard tissue map, ids in the top-level
        ``tissue_labels``) and ``params.json`` (the sampled simulation parameters).
    """
    train_ids, val_ids = _split_ids("sim", n_train, n_val)
    args: dict[str, object] = {"n_train": n_train, "n_val": n_val, "seed": seed}
    sim_options: dict[str, object] = {}
    if noise is not None:  # only then in the marker: cohorts built before the option keep theirs
        sim_options["noise"] = (float(noise[0]), float(noise[1]))
        args["noise"] = list(sim_options["noise"])
    if extracerebral_jitter is not None:
        sim_options["extracerebral_jitter"] = args["extracerebral_jitter"] = float(extracerebral_jitter)

    def fill(work: Path) -> None:
        maps, affine = load_tissue_maps()
        structures = load_structure_labels()
        entries = []
        for index, sid in enumerate(train_ids + val_ids):
            rng = np.random.default_rng([seed, _BRAIN_STREAM, index])
            deformation = random_deformation(rng, maps.shape[:3], affine, _BRAIN_DEFORM)
            tissue = deformation.apply(maps[..., :-1], order=1, cval=0.0)
            # Air is what the other tissues leave (linear interpolation keeps the sum <= 1), which
            # also makes everything pulled from outside the field of view air.
            air = np.clip(1.0 - tissue.sum(axis=-1, keepdims=True), 0.0, 1.0)
            subject_maps = np.concatenate([tissue, air], axis=-1)
            # structure-specific tissue values travel with the anatomy (mri_sim.apply_structures)
            subject_maps, scales = apply_structures(subject_maps, deformation.apply(structures, order=0, cval=0))
            images, params = simulate_subject(subject_maps, rng, scales=scales, **sim_options)
            entry: dict[str, str] = {"id": sid}
            for c in CONTRASTS:
                save_nifti(work / sid / f"{c}.nii.gz", images[c], affine, np.float32)
                entry[c] = f"{sid}/{c}.nii.gz"
            save_nifti(work / sid / "ct.nii.gz", ct_like(subject_maps), affine, np.float32)
            entry["ct"] = f"{sid}/ct.nii.gz"
            save_nifti(work / sid / "mask.nii.gz", brain_mask(subject_maps), affine, np.uint8)
            entry["mask"] = f"{sid}/mask.nii.gz"
            save_nifti(work / sid / "tissue.nii.gz", tissue_labels(subject_maps), affine, np.uint8)
            _write_json(work / sid / "params.json", _round_params(params))
            entries.append(entry)

        maps = apply_structures(maps, structures)[0]  # the test case's tissue labels as the subjects' are made
        test = {"id": "avg152"}
        for c, key in (("t1", "avg152T1.nii"), ("t2", "avg152T2.nii"), ("pd", "avg152PD.nii")):
            real = np.asarray(nib.load(str(_src(f"spm/{key}"))).dataobj, dtype=np.float32)
            save_nifti(work / "avg152" / f"{c}.nii.gz", quantise(normalise_percentile(real)), affine, np.float32)
            test[c] = f"avg152/{c}.nii.gz"
        save_nifti(work / "avg152" / "ct.nii.gz", ct_like(maps), affine, np.float32)
        test["ct"] = "avg152/ct.nii.gz"
        save_nifti(work / "avg152" / "mask.nii.gz", brain_mask(maps), affine, np.uint8)
        test["mask"] = "avg152/mask.nii.gz"
        save_nifti(work / "avg152" / "tissue.nii.gz", tissue_labels(maps), affine, np.uint8)

        datalist = {
            "name": "brain_mri_demo",
            "description": (
                "Simulated multi-contrast brain MRI (spin-echo T1w/T2w/PDw and inversion-recovery FLAIR from "
                "randomly deformed SPM tissue priors, random tissue and acquisition parameters, bias field, Rician "
                "noise; common.data.mri_sim) for training/validation; the real SPM avg152 T1/T2/PD templates as "
                "the held-out test case. Images scaled to [0, 1] by their 99.5th percentile."
            ),
            "licence": "Derived from SPM12 (GPL-2.0, Wellcome Centre for Human Neuroimaging): local use, do not redistribute",
            "reference": "SPM12 canonical avg152 templates and OldSeg tissue priors (ICBM-152)",
            "tensorImageSize": "3D",
            "spacing_mm": [2.0, 2.0, 2.0],
            "seed": seed,
            "modalities": list(CONTRASTS),
            # A CT-like image (HU, mri_sim.ct_like) of the same tissue maps, for MR/CT fusion.
            "ct": "<id>/ct.nii.gz, HU",
            # Not an entry key: every subject folder also holds the hard tissue map it was made from.
            "tissue_map": "<id>/tissue.nii.gz",
            "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
            "numTraining": n_train,
            "numValidation": n_val,
            "training": entries[:n_train],
            "validation": entries[n_train:],
            "test": [test],
        }
        _write_json(work / "datalist.json", datalist)

    return _build_cohort(out_dir, "brain_mri", "datalist.json", args, fill)


# --------------------------------------------------------------------------------------------
# CT


def _ct_intensity(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """Scanner-like intensity variation: HU gain/offset (calibration), Gaussian noise (dose),
    rounded to integer HU and clipped to the 12-bit CT range."""
    gain = rng.uniform(0.95, 1.05)
    offset = rng.uniform(-20.0, 20.0)
    sigma = rng.uniform(0.0, 15.0)
    out = gain * hu + offset + rng.normal(0.0, sigma, size=hu.shape)
    return np.clip(np.rint(out), -1024.0, 3071.0).astype(np.float32)


def build_ct_demo(out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 2, seed: int = 0) -> Path:
    """Deformation cohort of the TotalSegmentator example CT with merged organ labels.

    Args:
        out_dir: parent folder; the cohort goes to ``<out_dir>/ct``.
        n_train: deformed training copies (``ct_000`` ...).
        n_val: deformed validation copies (numbered after the training ones).
        seed: cohort seed; copy ``i`` uses the stream ``(seed, 2, i)``.

    Returns:
        Path of ``<out_dir>/ct/datalist.json``. Entries ``{"id", "image", "label"}``: float32 HU
        images and uint8 labels with ids of :data:`CT_LABELS`, 122x101x112 at 3 mm (RAS). Every
        entry, the ``test`` one (the original scan) included, has ``label`` (merged) and
        ``label_total`` (the 61 TotalSegmentator classes present, deformed like ``label``; names
        in the top-level ``total_labels``). ``datalist_total.json`` beside it lists the same cases
        with ``label_total`` as ``label`` (and ``label_merged``) and ``total_labels`` as ``labels``.
    """
    train_ids, val_ids = _split_ids("ct", n_train, n_val)
    args = {"n_train": n_train, "n_val": n_val, "seed": seed}

    def fill(work: Path) -> None:
        img = nib.load(str(_src("totalsegmentator/example_ct.nii.gz")))
        seg_img = nib.load(str(_src("totalsegmentator/example_seg_fast_force_split.nii.gz")))
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.allclose(affine, seg_img.affine, atol=1e-4):
            raise ValueError("the example CT and its segmentation are not on the same grid")
        hu = np.asarray(img.dataobj, dtype=np.float32)
        total = np.asarray(seg_img.dataobj).astype(np.uint8)
        merged = merge_total_labels(total)
        air = float(hu.min())

        entries = []
        for index, sid in enumerate(train_ids + val_ids):
            rng = np.random.default_rng([seed, _CT_STREAM, index])
            deformation = random_deformation(rng, hu.shape, affine, _CT_DEFORM)
            image = _ct_intensity(rng, deformation.apply(hu, order=1, cval=air))
            label = deformation.apply(merged, order=0, cval=0)
            # the TotalSegmentator classes under the same deformation: what maisi_ct maps to MAISI ids by name
            label_total = deformation.apply(total, order=0, cval=0)
            save_nifti(work / sid / "image.nii.gz", image, affine, np.float32)
            save_nifti(work / sid / "label.nii.gz", label, affine, np.uint8)
            save_nifti(work / sid / "label_total.nii.gz", label_total, affine, np.uint8)
            entries.append({"id": sid, "image": f"{sid}/image.nii.gz", "label": f"{sid}/label.nii.gz",
                            "label_total": f"{sid}/label_total.nii.gz"})

        save_nifti(work / "example" / "image.nii.gz", hu, affine, np.float32)
        save_nifti(work / "example" / "label.nii.gz", merged, affine, np.uint8)
        save_nifti(work / "example" / "label_total.nii.gz", total, affine, np.uint8)
        names = total_class_names()
        present = [int(v) for v in np.unique(total) if v != 0]
        datalist = {
            "name": "ct_demo",
            "description": (
                "Abdominal/pelvic CT (HU, 3 mm, RAS): random affine + B-spline deformations and HU gain/offset/noise "
                "variations of the TotalSegmentator 2.18.0 example scan for training/validation, the original scan as "
                "the test case. Labels are TotalSegmentator model outputs (regression references, not manual ground "
                "truth) merged to a few classes (common.data.demo.CT_CLASS_MERGE)."
            ),
            "licence": "Apache-2.0 (TotalSegmentator example data, source archive of totalsegmentator==2.18.0)",
            "reference": "Wasserthal et al., TotalSegmentator, Radiology: Artificial Intelligence 5(5):e230024, 2023",
            "tensorImageSize": "3D",
            "spacing_mm": [float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
            "seed": seed,
            "modality": {"0": "CT"},
            "labels": {str(k): v for k, v in CT_LABELS.items()},
            "total_labels": {"0": "background", **{str(k): names[k] for k in present}},
            "numTraining": n_train,
            "numValidation": n_val,
            "training": entries[:n_train],
            "validation": entries[n_train:],
            "test": [
                {
                    "id": "example",
                    "image": "example/image.nii.gz",
                    "label": "example/label.nii.gz",
                    "label_total": "example/label_total.nii.gz",
                }
            ],
        }
        _write_json(work / "datalist.json", datalist)
        # The same cases with the TotalSegmentator classes as "label" and their names as "labels": the datalist
        # maisi_ct trains on (its labels are mapped to MAISI ids by name, and the merged classes have no MAISI names)
        total_list = {
            **datalist,
            "name": "ct_demo_total",
            "labels": datalist["total_labels"],
            **{
                section: [{**e, "label": e["label_total"], "label_merged": e["label"]} for e in datalist[section]]
                for section in ("training", "validation", "test")
            },
        }
        _write_json(work / "datalist_total.json", total_list)

    return _build_cohort(out_dir, "ct", "datalist.json", args, fill)


#: Slab of the example CT used as the thin-slab framing case: slices 70..89 (3 mm: 60 mm),
#: through liver, spleen, kidneys, bowel and bone.
CT_SLAB_SLICES: tuple[int, int] = (70, 90)
#: ``example_ct_sm.nii.gz`` of TotalSegmentator is slices 82..111 of ``example_ct.nii.gz``
#: (identical voxels; its header keeps the full scan's origin).
CT_SM_FIRST_SLICE: int = 82


def _pad_with_air(array: np.ndarray, affine: np.ndarray, factor: float, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """``array`` centred in a field of view ``factor`` times larger along every axis, the affine
    shifted so that every original voxel keeps its physical position."""
    before = [int(round(n * (factor - 1.0) / 2.0)) for n in array.shape]
    after = [int(round(n * factor)) - n - b for n, b in zip(array.shape, before)]
    out = np.pad(array, list(zip(before, after)), mode="constant", constant_values=fill)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.asarray(before, dtype=np.float64)
    return out, shifted


def _slab(array: np.ndarray, affine: np.ndarray, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``first..stop-1`` along the third axis, the affine moved to the first kept slice."""
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, 3] + affine[:3, 2] * first
    return array[:, :, first:stop], shifted


def build_ct_framings(out_dir: str | os.PathLike) -> Path:
    """The held-out example CT as users' scans are framed: the cases a segmentation model must
    handle beyond the training framing.

    Cases (``test`` list of ``<out_dir>/ct_framings/datalist.json``, labels merged to
    :data:`CT_LABELS`):

    * ``example``: the original scan (122x101x112 at 3 mm).
    * ``example_fov150``: the scan centred in a field of view 1.5 times larger along every axis,
      padded with air (the scan's minimum HU) and background.
    * ``example_slab60``: a 60 mm slab (slices :data:`CT_SLAB_SLICES`).
    * ``example_slab60_fov150``: that slab centred in a field of view 1.5 times larger.
    * ``example_ct_sm``: TotalSegmentator's own 30-slice crop of the same patient
      (``example_ct_sm.nii.gz``) with its own reference labels (``example_seg.nii.gz``, 41 classes
      of the same ``total`` map) merged the same way, with the file's own header (which keeps the
      full scan's origin although it holds slices from :data:`CT_SM_FIRST_SLICE` on).

    Every file keeps the physical position of every voxel (affines shifted with the padding or
    the cut), as a scanner or a crop tool would write them.
    """

    def fill(work: Path) -> None:
        img = nib.load(str(_src("totalsegmentator/example_ct.nii.gz")))
        affine = np.asarray(img.affine, dtype=np.float64)
        hu = np.asarray(img.dataobj, dtype=np.float32)
        merged = merge_total_labels(np.asarray(nib.load(str(_src("totalsegmentator/example_seg_fast_force_split.nii.gz"))).dataobj))
        air = float(hu.min())
        cases = {"example": (hu, merged, affine)}
        cases["example_fov150"] = (*[_pad_with_air(a, affine, 1.5, v)[0] for a, v in ((hu, air), (merged, 0))], _pad_with_air(hu, affine, 1.5, air)[1])
        slab_hu, slab_affine = _slab(hu, affine, *CT_SLAB_SLICES)
        slab_label = _slab(merged, affine, *CT_SLAB_SLICES)[0]
        cases["example_slab60"] = (slab_hu, slab_label, slab_affine)
        cases["example_slab60_fov150"] = (
            _pad_with_air(slab_hu, slab_affine, 1.5, air)[0],
            _pad_with_air(slab_label, slab_affine, 1.5, 0)[0],
            _pad_with_air(slab_hu, slab_affine, 1.5, air)[1],
        )
        sm_hu = np.asarray(nib.load(str(_src("totalsegmentator/example_ct_sm.nii.gz"))).dataobj, dtype=np.float32)
        sm_label = merge_total_labels(np.asarray(nib.load(str(_src("totalsegmentator/example_seg.nii.gz"))).dataobj))
        sm_affine = np.asarray(nib.load(str(_src("totalsegmentator/example_ct_sm.nii.gz"))).affine, dtype=np.float64)
        cases["example_ct_sm"] = (sm_hu, sm_label, sm_affine)  # the file's own header, as a user has it
        entries = []
        for cid, (image, label, aff) in cases.items():
            save_nifti(work / cid / "image.nii.gz", image, aff, np.float32)
            save_nifti(work / cid / "label.nii.gz", label, aff, np.uint8)
            entries.append({"id": cid, "image": f"{cid}/image.nii.gz", "label": f"{cid}/label.nii.gz", "shape": list(image.shape)})
        _write_json(
            work / "datalist.json",
            {
                "name": "ct_framings",
                "description": (
                    "The held-out TotalSegmentator example CT framed as users' scans are: original, padded to a 1.5x "
                    "field of view with air, a 60 mm slab, that slab in a 1.5x field of view, and TotalSegmentator's own "
                    "30-slice crop with its own reference labels. Labels merged to a few classes (common.data.demo.CT_CLASS_MERGE)."
                ),
                "licence": "Apache-2.0 (TotalSegmentator example data, source archive of totalsegmentator==2.18.0)",
                "modality": {"0": "CT"},
                "labels": {str(k): v for k, v in CT_LABELS.items()},
                "training": [],
                "test": entries,
            },
        )

    return _build_cohort(out_dir, "ct_framings", "datalist.json", {}, fill)


# --------------------------------------------------------------------------------------------
# DWI

_DWI_SCHEMES = ("small_101D", "small_64D", "small_25")


#: the real avg152 test case as users' scans are framed (ids of :func:`build_brain_framings`)
BRAIN_FRAMINGS: dict[str, str] = {
    "avg152": "real avg152 (91x109x91 at 2 mm)",
    "avg152_fov150": "in a 1.5x field of view, background-padded",
    "avg152_slab40": "40 mm axial slab (20 slices)",
}
BRAIN_SLAB_SLICES = 20


def build_brain_framings(datalist: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The held-out avg152 case of a brain cohort (``test[0]`` of ``datalist``, every ``.nii.gz`` of it) as
    given, in a 1.5x in-plane field of view (MR padded with 0, the CT with -1000 HU) and cut to a central axial
    slab of :data:`BRAIN_SLAB_SLICES` slices; returns ``<out_dir>/framings/datalist.json`` (``test``: the
    :data:`BRAIN_FRAMINGS` cases, paths relative to it; ``training`` / ``validation`` kept, made absolute).

    Every file keeps the physical position of every voxel (affine shifted with the padding or the cut).
    """
    datalist = Path(datalist)
    dl = json.loads(datalist.read_text())
    case = dl["test"][0]
    root = Path(out_dir) / "framings"
    entries = []
    for name in BRAIN_FRAMINGS:
        entry = {"id": name}
        for key, rel in case.items():
            if key == "id" or not isinstance(rel, str) or not rel.endswith(".nii.gz"):
                continue
            img = nib.load(str(datalist.parent / rel))
            arr, aff = np.asarray(img.dataobj), img.affine.copy()
            if name.endswith("fov150"):
                pads = [(s // 4, s // 4) for s in arr.shape[:2]] + [(0, 0)]
                arr = np.pad(arr, pads, constant_values=-1000 if key == "ct" else 0)
                aff[:3, 3] -= aff[:3, :3] @ np.array([pads[0][0], pads[1][0], 0])
            elif name.endswith("slab40"):
                z0 = arr.shape[2] // 2 - BRAIN_SLAB_SLICES // 2
                arr = arr[:, :, z0 : z0 + BRAIN_SLAB_SLICES]
                aff[:3, 3] += aff[:3, :3] @ np.array([0, 0, z0])
            path = root / name / Path(rel).name
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.Nifti1Image(arr, aff).to_filename(str(path))
            entry[key] = str(path.relative_to(root))
        entries.append(entry)
    path = root / "datalist.json"
    for e in dl["training"] + dl["validation"]:  # the training entries stay valid relative to the new JSON
        for k, v in e.items():
            if isinstance(v, str) and v.endswith(".nii.gz"):
                e[k] = str(datalist.parent / v)
    path.write_text(json.dumps({"training": dl["training"], "validation": dl["validation"], "test": entries}, indent=1))
    return path


def build_dwi_demo(out_dir: str | os.PathLike) -> Path:
    """Copy dipy's real gradient tables (and the ``small_101D`` DWI) and describe them.

    Returns:
        Path of ``<out_dir>/dwi/schemes.json``: ``{"schemes": {name: {"bval", "bvec"}}, "smoke":
        {"dwi", "bval", "bvec"}}`` with paths relative to the JSON.
    """

    def fill(work: Path) -> None:
        schemes = {}
        for name in _DWI_SCHEMES:
            for ext in ("bval", "bvec"):
                _atomic_write_bytes(work / f"{name}.{ext}", Path(_src(f"dipy/{name}.{ext}")).read_bytes())
            schemes[name] = {"bval": f"{name}.bval", "bvec": f"{name}.bvec"}
        _atomic_write_bytes(work / "small_101D.nii.gz", Path(_src("dipy/small_101D.nii.gz")).read_bytes())
        _write_json(
            work / "schemes.json",
            {
                "name": "dwi_demo",
                "description": (
                    "Real diffusion acquisition schemes shipped with dipy 1.12.1: small_101D (multi-shell, b 0..4065 "
                    "s/mm^2), small_64D (b 1000, 64 directions), small_25 (b 2000, 25 directions); small_101D's DWI "
                    "(6x10x10x102 at 2.5 mm) for smoke tests."
                ),
                "licence": "BSD-3-Clause (dipy)",
                "schemes": schemes,
                "smoke": {"dwi": "small_101D.nii.gz", "bval": "small_101D.bval", "bvec": "small_101D.bvec"},
            },
        )

    return _build_cohort(out_dir, "dwi", "schemes.json", {}, fill)


def build_all(out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 2, seed: int = 0) -> dict[str, Path]:
    """Build the three cohorts; returns ``{"brain_mri": ..., "ct": ..., "dwi": ...}`` JSON paths."""
    return {
        "brain_mri": build_brain_mri_demo(out_dir, n_train, n_val, seed),
        "ct": build_ct_demo(out_dir, n_train, n_val, seed),
        "dwi": build_dwi_demo(out_dir),
    }


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        description="Build the demo cohorts (Decathlon-style datalists) from real package-shipped images."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--what", nargs="+", choices=["brain_mri", "ct", "dwi", "ct_framings"], default=["brain_mri", "ct", "dwi"],
        help="cohorts to build; ct_framings: the held-out CT reframed (build_ct_framings)",
    )
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mri-noise", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
        help="brain_mri: range of the relative Rician noise sigma (default: the simulator's 0.01 0.03; 0 0: noise-free)",
    )
    parser.add_argument(
        "--mri-extracerebral-jitter", type=float, default=None, metavar="J",
        help="brain_mri: per-subject PD/T1/T2 of bone and scalp drawn in U(1 -+ J) (default: the brain's 0.03)",
    )
    args = parser.parse_args(argv)
    out: dict[str, Path] = {}
    for what in args.what:
        if what == "dwi":
            out[what] = build_dwi_demo(args.out)
        elif what == "ct_framings":
            out[what] = build_ct_framings(args.out)
        elif what == "brain_mri":
            out[what] = build_brain_mri_demo(args.out, args.n_train, args.n_val, args.seed, noise=args.mri_noise,
                                             extracerebral_jitter=args.mri_extracerebral_jitter)
        else:
            out[what] = build_ct_demo(args.out, args.n_train, args.n_val, args.seed)
        print(what, out[what])
    return out


if __name__ == "__main__":
    main()
