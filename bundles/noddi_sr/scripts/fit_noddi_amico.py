"""Fit NODDI with AMICO: HR training targets for real data, and the low-resolution fit baseline (B1).

AMICO (Daducci et al., NeuroImage 105:32-44, 2015; PyPI ``dmri-amico``, *not* ``amico``) linearises NODDI on a
dictionary of kernels. The in vivo defaults are those of the NODDI toolbox (dPar 1.7e-3 mm²/s, dIso 3.0e-3 mm²/s),
the same constants as :mod:`common.data.noddi`. AMICO reports NDI as the intra-neurite fraction of the non-CSF
tissue (NODDI toolbox ``ficvf``), ODI, and FWF (= f_iso), the channel order of this bundle.

Usage::

    # HR targets of one HCP subject (writes <out_dir>/fit_{NDI,ODI,FWF}.nii.gz)
    python scripts/fit_noddi_amico.py --dwi <subject>/T1w/Diffusion/data.nii.gz \
        --bval <subject>/T1w/Diffusion/bvals --bvec <subject>/T1w/Diffusion/bvecs \
        --mask <subject>/T1w/Diffusion/nodif_brain_mask.nii.gz --out_dir <noddi_root>/<subject>

    # baseline B1: fit the LR input, then upsample ×2 (trilinear) onto the HR grid of the bundle
    python scripts/fit_noddi_amico.py --dwi dwi_lr.nii.gz --bval dwi_lr.bval --bvec dwi_lr.bvec \
        --mask mask_lr.nii.gz --out_dir <case>/amico_lr --upsample 2

``amico`` is imported only when a fit runs, so the bundle works without it. Kernels are regenerated for every scheme
(spec pitfall 12: stale kernels of another scheme give wrong maps). b-values are in s/mm² and shells are grouped with
``bStep=100``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.data.dwi import read_bvals_bvecs
from common.utils.amico import import_amico, keep_logger_class
from common.data.noddi_phantom import hr_affine
from common.utils.errors import InvalidInputError

__all__ = ["fit_noddi", "fit_noddi_arrays", "upsample_maps", "MAP_NAMES"]

MAP_NAMES = ("NDI", "ODI", "FWF")


def fit_noddi(
    dwi: str, bval: str, bvec: str, mask: str | None, out_dir: str, b0_threshold: float = 50.0, b_step: float = 100.0, verbose: int | None = None
) -> list[Path]:
    """AMICO NODDI fit; returns the paths of ``fit_NDI``, ``fit_ODI`` and ``fit_FWF`` in ``out_dir``.

    ``verbose``: AMICO's verbosity (0 silent … 4 debug); None leaves AMICO's setting.
    """
    amico = import_amico("lut", "util")  # lazy: an optional dependency (dmri-amico); keeps logging's logger class
    dwi, bval, bvec = (os.path.abspath(os.fspath(p)) for p in (dwi, bval, bvec))
    mask = None if mask is None else os.path.abspath(os.fspath(mask))
    shape = nib.load(dwi).shape
    if len(shape) != 4:
        raise InvalidInputError(f"input file '{dwi}' (--dwi) has shape {shape}; expected a 4D diffusion-weighted series")
    n = shape[3]
    read_bvals_bvecs(bval, bvec, n_volumes=n)  # fail early, naming the file, on a mismatching table
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if verbose is not None:
        amico.set_verbose(int(verbose))
    # amico.setup() precomputes the rotation matrices of every supported direction count (up to 32761); the fit
    # below uses AMICO's default of 500 directions (lmax 12), so only that one is computed (cached by AMICO).
    amico.lut.precompute_rotation_matrices(12, 500)
    with keep_logger_class(), tempfile.TemporaryDirectory(prefix="amico_") as study:  # dicelib may set it up again
        scheme = amico.util.fsl2scheme(bval, bvec, schemeFilename=os.path.join(study, "dwi.scheme"), bStep=b_step)
        ae = amico.Evaluation(study, ".")
        ae.load_data(dwi, scheme, mask_filename=mask, b0_thr=b0_threshold)
        ae.set_model("NODDI")
        ae.generate_kernels(regenerate=True, lmax=12, ndirs=500)
        ae.load_kernels()
        ae.fit()
        ae.save_results()
        results = Path(study) / "AMICO" / "NODDI"
        paths = []
        for name in MAP_NAMES:
            src = results / f"fit_{name}.nii.gz"
            dst = out / f"fit_{name}.nii.gz"
            dst.write_bytes(src.read_bytes())  # the study folder is temporary (possibly another file system)
            paths.append(dst)
    return paths


def fit_noddi_arrays(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    work_dir: str | os.PathLike | None = None,
    b0_threshold: float = 50.0,
    verbose: int | None = 0,
) -> np.ndarray:
    """AMICO NODDI fit of in-memory signals: ``dwi`` (N, X, Y, Z) → maps (3, X, Y, Z) = NDI, ODI, FWF (0 outside ``mask``).

    The arrays are written as NIfTI + FSL files (in ``work_dir``, or a temporary folder) and fitted by
    :func:`fit_noddi`, the same path as the command line. A voxel list fits as a (N, V, 1, 1) series.
    """
    from common.data.dwi import write_bvals_bvecs

    dwi = np.asarray(dwi, dtype=np.float32)
    if dwi.ndim != 4:
        raise InvalidInputError(f"dwi array has shape {dwi.shape}; expected (N, X, Y, Z)")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="amico_in_") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.moveaxis(dwi, 0, -1), affine), folder / "dwi.nii.gz")
        write_bvals_bvecs(folder / "dwi.bval", folder / "dwi.bvec", bvals, bvecs)
        mask_path = None
        if mask is not None:
            mask_path = folder / "mask.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine), mask_path)
        paths = fit_noddi(folder / "dwi.nii.gz", folder / "dwi.bval", folder / "dwi.bvec", mask_path, folder / "fit",
                          b0_threshold=b0_threshold, verbose=verbose)
        maps = np.stack([np.nan_to_num(np.asarray(nib.load(str(p)).dataobj, dtype=np.float64)) for p in paths])
    if mask is not None:
        maps = maps * (np.asarray(mask) > 0)[None]
    return maps


def upsample_maps(paths: list[Path | str], out_file: str | os.PathLike, scale: int = 2) -> Path:
    """Stack LR maps and resample them trilinearly onto the ×``scale`` HR grid (affine of :func:`hr_affine`), clipped.

    HR voxel i lies at LR voxel coordinate (i + ½)/s − ½, the HR grid of the bundle's inference output.
    """
    imgs = [nib.load(str(p)) for p in paths]
    lr = np.stack([np.nan_to_num(np.asarray(i.dataobj, dtype=np.float64)) for i in imgs])
    shape = [s * scale for s in lr.shape[1:]]
    coords = np.meshgrid(*[(np.arange(s) + 0.5) / scale - 0.5 for s in shape], indexing="ij")
    hr = np.stack([ndimage.map_coordinates(m, coords, order=1, mode="nearest") for m in lr])
    hr = np.clip(hr, 0.0, 1.0).astype(np.float32)
    affine = hr_affine(imgs[0].affine, scale)
    img = nib.Nifti1Image(np.moveaxis(hr, 0, -1), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, os.fspath(out_file))
    return Path(out_file)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fit NODDI with AMICO (optionally upsample the maps onto the HR grid).")
    ap.add_argument("--dwi", required=True)
    ap.add_argument("--bval", required=True)
    ap.add_argument("--bvec", required=True)
    ap.add_argument("--mask", default=None)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--b0_threshold", type=float, default=50.0)
    ap.add_argument("--upsample", type=int, default=0, help="write fit_noddi_x<k>.nii.gz on the ×k HR grid")
    a = ap.parse_args(argv)
    paths = fit_noddi(a.dwi, a.bval, a.bvec, a.mask, a.out_dir, a.b0_threshold)
    if a.upsample > 1:
        print(upsample_maps(paths, Path(a.out_dir) / f"fit_noddi_x{a.upsample}.nii.gz", a.upsample))
    else:
        print(*paths, sep="\n")


if __name__ == "__main__":
    main()
