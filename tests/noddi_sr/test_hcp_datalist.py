"""HCP-style folder → datalist: crop, signal-domain LR, geometry, tissue masks and split (a synthetic HCP layout)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from common.data.fetch import demo_file
from common.data.hcp_datalist import build_hcp_datalist, hcp_subjects, tissue_masks
from common.data.noddi_phantom import block_average, lr_affine


def _fake_hcp(root, noddi_root, subject, rng):
    diff = root / subject / "T1w" / "Diffusion"
    diff.mkdir(parents=True)
    aff = np.array([[-1.25, 0, 0, 90.0], [0, 1.25, 0, -126.0], [0, 0, 1.25, -72.0], [0, 0, 0, 1]])
    shape = (14, 16, 12)
    nib.save(nib.Nifti1Image(rng.uniform(100, 1000, (*shape, 26)).astype(np.float32), aff), diff / "data.nii.gz")
    shutil.copy(demo_file("dipy/small_25.bval"), diff / "bvals")
    shutil.copy(demo_file("dipy/small_25.bvec"), diff / "bvecs")
    mask = np.zeros(shape, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    nib.save(nib.Nifti1Image(mask, aff), diff / "nodif_brain_mask.nii.gz")
    # aparc+aseg on a finer grid (0.625 mm, same origin): WM label 2 in the lower half, cortex 1001 in the upper half
    fine = aff @ np.diag([0.5, 0.5, 0.5, 1.0])
    lab = np.zeros((28, 32, 24), np.int32)
    lab[:, :, :12] = 2
    lab[:, :, 12:] = 1001
    nib.save(nib.Nifti1Image(lab, fine), root / subject / "T1w" / "aparc+aseg.nii.gz")
    (noddi_root / subject).mkdir(parents=True)
    for name in ("NDI", "ODI", "FWF"):
        nib.save(nib.Nifti1Image(rng.uniform(-0.1, 1.1, shape).astype(np.float32), aff), noddi_root / subject / f"fit_{name}.nii.gz")


def test_build_hcp_datalist(tmp_path):
    rng = np.random.default_rng(0)
    hcp, noddi, out = tmp_path / "hcp", tmp_path / "noddi", tmp_path / "out"
    for s in ("100307", "100408", "101915"):
        _fake_hcp(hcp, noddi, s, rng)
    (hcp / "not_a_subject").mkdir()
    assert hcp_subjects(hcp) == ["100307", "100408", "101915"]
    path = build_hcp_datalist(hcp, noddi, out, split=(1, 1, 1), crop=(12, 14, 10))
    dl = json.loads(path.read_text())
    assert [len(dl[k]) for k in ("training", "validation", "test", "testing")] == [1, 1, 1, 1]
    e = dl["training"][0]
    src = nib.load(hcp / e["id"] / "T1w" / "Diffusion" / "data.nii.gz")
    hr = nib.load(out / e["noddi"])
    lr = nib.load(out / e["dwi"])
    assert hr.shape == (12, 14, 10, 3) and lr.shape == (6, 7, 5, 26)
    # centre crop starts at voxel (1, 1, 1); LR = block average of the cropped HR signals on lr_affine's grid
    np.testing.assert_allclose(hr.affine[:3, 3], (src.affine @ [1, 1, 1, 1])[:3])
    np.testing.assert_allclose(lr.affine, lr_affine(hr.affine), atol=1e-6)
    expect = block_average(np.moveaxis(src.get_fdata()[1:13, 1:15, 1:11], -1, 0), 2)
    np.testing.assert_allclose(np.moveaxis(lr.get_fdata(), -1, 0), expect, rtol=1e-5)
    maps = hr.get_fdata()
    assert maps.min() >= 0 and maps.max() <= 1
    wm, gm = nib.load(out / e["wm"]).get_fdata() > 0, nib.load(out / e["gm"]).get_fdata() > 0
    assert wm.any() and gm.any() and not (wm & gm).any()
    assert wm[:, :, :3].any() and not wm[:, :, 7:].any()  # label 2 in the lower half of the world z range
    with pytest.raises(ValueError, match="subjects"):
        build_hcp_datalist(hcp, noddi, tmp_path / "o2", split=(3, 1, 1))


def test_tissue_masks_identity_grid():
    lab = np.zeros((4, 4, 4), np.int32)
    lab[0] = 41
    lab[1] = 1035
    lab[2] = 24  # CSF: neither
    wm, gm = tissue_masks(nib.Nifti1Image(lab, np.eye(4)), np.eye(4), (4, 4, 4))
    assert wm[0].all() and gm[1].all() and not wm[2].any() and not gm[2].any()
