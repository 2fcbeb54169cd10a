"""HCP-style folders → the noddi_sr training layout and its Decathlon datalist (noddi_sr spec §5).

Input (HCP Young Adult, WU-Minn S1200 preprocessed diffusion; ConnectomeDB open-access data use terms — nothing is
downloaded here)::

    <hcp_root>/<subject>/T1w/Diffusion/{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz}   145×174×145 @ 1.25 mm
    <hcp_root>/<subject>/T1w/aparc+aseg.nii.gz                                               FreeSurfer labels (T1w space)
    <noddi_root>/<subject>/fit_{NDI,ODI,FWF}.nii.gz      AMICO NODDI fit of the HR data (scripts/fit_noddi_amico.py)

Per subject (written under ``<out_dir>/<subject>/``): centre crop of the HR grid to ``crop`` (136×172×136, the CLDM
volume size), ``noddi_hr`` (the 3 fitted maps, clipped to [0, 1]), ``mask_hr``, WM/GM masks from aparc+aseg (resampled
nearest-neighbour through the world coordinates; WM = {2, 7, 41, 46, 251–255}, GM = cortex 1000–1035, 2000–2035 and
subcortical grey {3, 8, 10–13, 17, 18, 26, 42, 47, 49–54, 58}), and the LR input: 2×2×2 block average of the HR
**signals** (optionally Rician noise), LR affine from :func:`common.data.noddi_phantom.lr_affine`, the gradient files
(checked against the DWI). The split is by subject, in sorted order after a seeded permutation: 30 / 3 / 10 (CLDM
30 training and 3 validation subjects; 10 test subjects, ours).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.dwi import read_bvals_bvecs, write_bvals_bvecs
from common.data.noddi_phantom import block_average, lr_affine
from common.data.datalists import refuse_existing_datalist, write_json_atomic
from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["WM_LABELS", "GM_LABELS", "hcp_subjects", "tissue_masks", "prepare_hcp_subject", "build_hcp_datalist"]

WM_LABELS = frozenset([2, 7, 41, 46, 251, 252, 253, 254, 255])
GM_LABELS = frozenset(
    list(range(1000, 1036)) + list(range(2000, 2036)) + [3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58]
)


def hcp_subjects(hcp_root: str | os.PathLike) -> list[str]:
    """Subject folders that hold the preprocessed diffusion files, sorted."""
    root = Path(hcp_root)
    if not root.is_dir():
        raise InputNotFoundError(f"HCP folder '{root}' does not exist")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        diff = d / "T1w" / "Diffusion"
        if all((diff / f).is_file() for f in ("data.nii.gz", "bvals", "bvecs", "nodif_brain_mask.nii.gz")):
            out.append(d.name)
    return out


def _centre_crop_slices(shape: Sequence[int], crop: Sequence[int]) -> tuple[slice, ...]:
    if any(c > s for c, s in zip(crop, shape)):
        raise InvalidInputError(f"crop {tuple(crop)} is larger than the volume {tuple(shape)}")
    if any(c % 2 for c in crop):
        raise InvalidInputError(f"crop {tuple(crop)} must be even (2× block averaging)")
    return tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(shape, crop))


def _cropped_affine(affine: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = (affine @ np.array([s.start for s in slices] + [1.0]))[:3]
    return out


def tissue_masks(aparc: nib.Nifti1Image, target_affine: np.ndarray, target_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """WM and GM masks on a target grid from a FreeSurfer aparc+aseg image (nearest neighbour via world coordinates)."""
    labels = np.asarray(aparc.dataobj).astype(np.int64)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in target_shape], indexing="ij"), -1).reshape(-1, 3)
    world = target_affine[:3, :3] @ ijk.T + target_affine[:3, 3:4]
    src = np.linalg.inv(aparc.affine)
    vox = np.rint(src[:3, :3] @ world + src[:3, 3:4]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(labels.shape)[:, None]), axis=0)
    lab = np.zeros(ijk.shape[0], dtype=np.int64)
    lab[inside] = labels[vox[0, inside], vox[1, inside], vox[2, inside]]
    lab = lab.reshape(tuple(target_shape))
    return np.isin(lab, list(WM_LABELS)), np.isin(lab, list(GM_LABELS))


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, os.fspath(path))


def prepare_hcp_subject(
    hcp_root: str | os.PathLike,
    noddi_root: str | os.PathLike,
    subject: str,
    out_dir: str | os.PathLike,
    crop: Sequence[int] = (136, 172, 136),
    snr: float | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Write one subject's training files (module docstring); returns its datalist entry (paths relative to out_dir)."""
    diff = Path(hcp_root) / subject / "T1w" / "Diffusion"
    dwi_img = nib.load(diff / "data.nii.gz")
    table = read_bvals_bvecs(diff / "bvals", diff / "bvecs", n_volumes=dwi_img.shape[3])
    sl = _centre_crop_slices(dwi_img.shape[:3], crop)
    a_hr = _cropped_affine(dwi_img.affine, sl)
    a_lr = lr_affine(a_hr, 2)
    out = Path(out_dir) / subject
    out.mkdir(parents=True, exist_ok=True)
    mask_hr = np.asarray(nib.load(diff / "nodif_brain_mask.nii.gz").dataobj)[sl] > 0
    maps = []
    for name in ("NDI", "ODI", "FWF"):
        path = Path(noddi_root) / subject / f"fit_{name}.nii.gz"
        if not path.is_file():
            raise InputNotFoundError(f"'{path}' is missing: fit NODDI on the HR data first (bundles/noddi_sr/scripts/fit_noddi_amico.py)")
        maps.append(np.clip(np.nan_to_num(np.asarray(nib.load(path).dataobj, dtype=np.float32)[sl]), 0.0, 1.0) * mask_hr)
    _save(np.stack(maps, -1).astype(np.float32), a_hr, out / "noddi_hr.nii.gz")
    _save(mask_hr.astype(np.uint8), a_hr, out / "mask_hr.nii.gz")
    aparc_path = Path(hcp_root) / subject / "T1w" / "aparc+aseg.nii.gz"
    wm, gm = tissue_masks(nib.load(aparc_path), a_hr, crop)
    _save((wm & mask_hr).astype(np.uint8), a_hr, out / "wm_hr.nii.gz")
    _save((gm & mask_hr).astype(np.uint8), a_hr, out / "gm_hr.nii.gz")
    # LR input: block average of the HR signals, volume by volume (a whole HCP series is ~2.6 GB in float32)
    lr = np.empty((*[c // 2 for c in crop], dwi_img.shape[3]), dtype=np.float32)
    rng = np.random.default_rng([int(seed), sum(map(ord, subject))])
    for v in range(dwi_img.shape[3]):
        vol = block_average(np.asarray(dwi_img.dataobj[..., v], dtype=np.float64)[sl], 2)
        if snr:
            sigma = 700.0 / float(snr)
            vol = np.sqrt((vol + sigma * rng.standard_normal(vol.shape)) ** 2 + (sigma * rng.standard_normal(vol.shape)) ** 2)
        lr[..., v] = vol
    _save(lr, a_lr, out / "dwi_lr.nii.gz")
    write_bvals_bvecs(out / "dwi_lr.bval", out / "dwi_lr.bvec", table.bvals, table.bvecs)
    _save((block_average(mask_hr.astype(np.float32), 2) >= 0.5).astype(np.uint8), a_lr, out / "mask_lr.nii.gz")
    return {
        "id": subject,
        "dwi": f"{subject}/dwi_lr.nii.gz",
        "bval": f"{subject}/dwi_lr.bval",
        "bvec": f"{subject}/dwi_lr.bvec",
        "mask": f"{subject}/mask_lr.nii.gz",
        "noddi": f"{subject}/noddi_hr.nii.gz",
        "mask_hr": f"{subject}/mask_hr.nii.gz",
        "wm": f"{subject}/wm_hr.nii.gz",
        "gm": f"{subject}/gm_hr.nii.gz",
    }


def build_hcp_datalist(
    hcp_root: str | os.PathLike,
    noddi_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: Sequence[int] = (30, 3, 10),
    subjects: Sequence[str] | None = None,
    crop: Sequence[int] = (136, 172, 136),
    snr: float | None = None,
    seed: int = 0,
    datalist_name: str = "datalist.json",
    overwrite: bool = False,
) -> Path:
    """Prepare every subject and write ``<out_dir>/<datalist_name>`` with training / validation / test / testing.

    An existing datalist is kept (its split belongs to the models trained on it) unless ``overwrite``;
    the check runs before any subject is prepared."""
    path = Path(out_dir) / datalist_name
    refuse_existing_datalist(path, overwrite)
    subjects = sorted(subjects) if subjects is not None else hcp_subjects(hcp_root)
    n_train, n_val, n_test = (int(s) for s in split)
    if len(subjects) < n_train + n_val + n_test:
        raise InvalidInputError(f"{len(subjects)} subjects with diffusion data in '{hcp_root}', the split needs {n_train + n_val + n_test}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    chosen = [subjects[i] for i in order[: n_train + n_val + n_test]]
    entries = [prepare_hcp_subject(hcp_root, noddi_root, s, out_dir, crop=crop, snr=snr, seed=seed) for s in chosen]
    test = entries[n_train + n_val :]
    datalist = {
        "description": "HCP Young Adult (WU-Minn S1200) preprocessed diffusion, LR = 2x2x2 block average of HR signals",
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": test,
        "testing": [{k: e[k] for k in ("id", "dwi", "bval", "bvec", "mask")} for e in test],
    }
    write_json_atomic(path, datalist)
    return path
