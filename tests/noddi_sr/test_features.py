"""Rotation-invariant DWI features: exact invariance on dipy's real DWI, approximate invariance on simulated tissue."""

import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged

from common.data.dwi import GradientTableError, read_bvals_bvecs
from common.data.fetch import demo_file
from common.data.noddi import NODDIModel
from common.data.noddi_phantom import fibonacci_directions
from common.transforms.dwi import DWIBrainMaskd, DWIFeaturesd, RandScaledPairCropd, brain_mask_from_s0, real_sh_basis_l2, shell_features

SHELLS = [1500, 3100]  # two of small_101D's shells with >= 6 directions


def _random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def real_dwi():
    d = LoadImaged("dwi", ensure_channel_first=True, image_only=True)({"dwi": str(demo_file("dipy/small_101D.nii.gz"))})
    t = read_bvals_bvecs(demo_file("dipy/small_101D.bval"), demo_file("dipy/small_101D.bvec"), n_volumes=102)
    return d["dwi"], t


def test_sh_basis_orthonormal():
    g = np.random.default_rng(0).normal(size=(200000, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    y = real_sh_basis_l2(g)
    np.testing.assert_allclose(y.T @ y * 4 * np.pi / len(g), np.eye(6), atol=2e-2)


def test_invariant_to_rotating_the_real_gradient_table(real_dwi):
    img, t = real_dwi
    arr = img.numpy()
    ref, used = shell_features(arr, t.bvals, t.bvecs, shells=SHELLS)
    assert ref.shape == (4, 6, 10, 10) and len(used) == 2
    assert np.all(np.isfinite(ref)) and ref[:2].max() > 0.05 and ref[2:].max() > 0.0
    for seed in range(3):
        r = _random_rotation(seed)
        signs = np.where(np.random.default_rng(seed).random(len(t.bvals)) < 0.5, -1.0, 1.0)[:, None]  # antipodal flips
        rot, _ = shell_features(arr, t.bvals, (t.bvecs @ r.T) * signs, shells=SHELLS)
        np.testing.assert_allclose(rot, ref, rtol=1e-5, atol=1e-6)
    # a non-rotation (anisotropic scaling) of the table does change the l=2 power: the test is not vacuous
    skew = t.bvecs * np.array([1.0, 0.3, 1.0])
    skew[t.bvals > 50] /= np.linalg.norm(skew[t.bvals > 50], axis=1, keepdims=True)
    other, _ = shell_features(arr, t.bvals, skew, shells=SHELLS)
    assert np.abs(other[2:] - ref[2:]).max() > 1e-3


def test_s0_scaling_leaves_features_unchanged(real_dwi):
    img, t = real_dwi
    a, _ = shell_features(img.numpy(), t.bvals, t.bvecs, shells=SHELLS)
    b, _ = shell_features(img.numpy() * 3.7, t.bvals, t.bvecs, shells=SHELLS)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tissue_rotation_and_direction_sets_on_simulated_voxels():
    """Spec §9: rotating mu with a fixed 60-direction shell, or two 60-direction sets, change features < 2 %."""
    rng = np.random.default_rng(1)
    n = 40
    ndi, odi, fwf = rng.uniform(0.3, 0.8, n), rng.uniform(0.05, 0.6, n), rng.uniform(0.0, 0.3, n)
    mu = rng.normal(size=(n, 3))
    feats = []
    for g_seed, mu_rot in [(0, np.eye(3)), (0, _random_rotation(5)), (7, np.eye(3))]:
        bvals = np.concatenate([[0.0], np.full(60, 1000.0), np.full(60, 2000.0)])
        bvecs = np.concatenate([np.zeros((1, 3)), fibonacci_directions(60, g_seed), fibonacci_directions(60, g_seed + 1)])
        sig = NODDIModel(bvals, bvecs)(ndi, odi, fwf, mu @ mu_rot.T)  # (n, N)
        f, _ = shell_features(sig.T.reshape(-1, n, 1, 1), bvals, bvecs, shells=[1000, 2000])
        feats.append(f[:, :, 0, 0])
    for other in feats[1:]:
        rel = np.abs(other - feats[0]) / np.maximum(np.abs(feats[0]), 1e-3)
        assert rel.max() < 0.02


def test_transform_on_files_checks_counts_and_shells(tmp_path):
    d = {"dwi": str(demo_file("dipy/small_101D.nii.gz")), "bval": str(demo_file("dipy/small_101D.bval")), "bvec": str(demo_file("dipy/small_101D.bvec"))}
    d = LoadImaged("dwi", ensure_channel_first=True, image_only=True)(d)
    with pytest.warns(UserWarning):
        out = DWIFeaturesd("dwi", shells=SHELLS)(d)
    assert out["dwi"].shape == (4, 6, 10, 10)
    np.testing.assert_allclose(out["dwi"].affine.numpy(), d["dwi"].affine.numpy())
    with pytest.warns(UserWarning):
        out_b0 = DWIFeaturesd("dwi", shells=SHELLS, include_b0=True)(d)
    assert out_b0["dwi"].shape[0] == 5
    with pytest.raises(GradientTableError, match=r"expected shell b=1000"):
        DWIFeaturesd("dwi", shells=[1000, 2000], shell_tolerance=50)(d)
    with pytest.raises(GradientTableError, match="small_25.bval"):
        DWIFeaturesd("dwi", bval_key="bval25", bvec_key="bvec25")(
            {**d, "bval25": str(demo_file("dipy/small_25.bval")), "bvec25": str(demo_file("dipy/small_25.bvec"))}
        )


def test_paired_crop_covers_the_same_field_of_view():
    from monai.data import MetaTensor

    lr_aff = torch.tensor([[2.0, 0, 0, 10], [0, 2, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]])
    from common.data.noddi_phantom import hr_affine

    lr = MetaTensor(torch.rand(4, 12, 12, 12), affine=lr_aff)
    hr = MetaTensor(torch.rand(3, 24, 24, 24), affine=torch.as_tensor(hr_affine(lr_aff.numpy())))
    fg = torch.zeros(1, 24, 24, 24)
    fg[:, 12:, 12:, 12:] = 1
    t = RandScaledPairCropd("lr", ["hr", "fg"], 4, scale=2, fg_key="fg", min_fg_fraction=0.5)
    t.set_random_state(0)
    out = t({"lr": lr, "hr": hr, "fg": fg})
    assert out["lr"].shape == (4, 4, 4, 4) and out["hr"].shape == (3, 8, 8, 8)
    assert float(out["fg"].mean()) >= 0.5
    # the LR patch's voxel centre 0 is the mean of the HR patch's voxel centres 0 and 1
    c_lr = out["lr"].affine.numpy() @ np.array([0, 0, 0, 1.0])
    c_hr = (out["hr"].affine.numpy() @ np.array([0, 0, 0, 1.0]) + out["hr"].affine.numpy() @ np.array([1, 1, 1, 1.0])) / 2
    np.testing.assert_allclose(c_lr, c_hr, atol=1e-5)


def test_brain_mask_from_real_b0(real_dwi):
    img, _ = real_dwi
    d = {"dwi": img, "bval": str(demo_file("dipy/small_101D.bval")), "bvec": str(demo_file("dipy/small_101D.bvec"))}
    m = DWIBrainMaskd("dwi")(d)["mask"]
    # small_101D is cropped inside the brain (S0 >= 179): no background, every voxel is kept
    assert m.shape == (1, 6, 10, 10) and bool(m.all())
    np.testing.assert_allclose(m.affine.numpy(), img.affine.numpy())
    # the same series inside a field of view with Rician background: the background is excluded
    rng = np.random.default_rng(0)
    s0 = np.abs(rng.normal(0, 10, (12, 16, 16)) + 1j * rng.normal(0, 10, (12, 16, 16)))
    s0[3:9, 3:13, 3:13] = img[0].numpy()
    mask = brain_mask_from_s0(s0)
    assert mask[3:9, 3:13, 3:13].all() and mask.sum() == 600
    given = DWIBrainMaskd("dwi")({**d, "mask": torch.zeros(1, 6, 10, 10)})["mask"]
    assert not bool(given.any())  # a given mask is kept
