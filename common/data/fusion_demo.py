"""Semi-synthetic T2 + CT fusion pair (ICBM-152 space) for the ivan_fusion tests and benchmark.

Derived from SPM12 files (GPL-2.0): build it locally, do not redistribute it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["build_fusion_demo"]


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
