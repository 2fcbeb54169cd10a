"""Image metrics against scikit-image and MONAI on real brain MRI (ICBM-152 average T1/T2/PD)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric
from monai.metrics.regression import _gaussian_kernel, compute_ssim_and_cs
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.data.fetch import demo_file
from common.metrics import flat_ssim, mae, nmse, pearson_r, psnr, psnr_per_slice, ssim3d, ssim_per_slice


def _load01(key: str) -> np.ndarray:
    a = np.asarray(nib.load(demo_file(key)).dataobj, dtype=np.float64)
    return (a - a.min()) / (a.max() - a.min())


@pytest.fixture(scope="module")
def brain() -> dict[str, np.ndarray]:
    t1, t2, pd = _load01("spm/avg152T1.nii"), _load01("spm/avg152T2.nii"), _load01("spm/avg152PD.nii")
    tissue = [np.asarray(nib.load(demo_file(k)).dataobj, dtype=np.float64) for k in ("spm/grey.nii", "spm/white.nii")]
    mask = (tissue[0] + tissue[1]) > 0.5  # brain mask from the SPM grey/white priors (same grid)
    return {"t1": t1, "t2": t2, "pd": pd, "mask": mask}


def test_psnr_matches_skimage_whole_and_masked(brain):
    t1, t2, m = brain["t1"], brain["t2"], brain["mask"]
    assert psnr(t1, t2) == pytest.approx(peak_signal_noise_ratio(t2, t1, data_range=1.0), abs=1e-10)
    ref_masked = peak_signal_noise_ratio(t2[m], t1[m], data_range=1.0)
    assert psnr(t1, t2, mask=m) == pytest.approx(ref_masked, abs=1e-10)
    assert abs(psnr(t1, t2, mask=m) - psnr(t1, t2)) > 0.1  # the mask changes the result
    # torch tensors and data_range
    assert psnr(torch.tensor(t1 * 255), torch.tensor(t2 * 255), data_range=255.0) == pytest.approx(psnr(t1, t2))


def test_psnr_known_values_and_mask_isolation(brain):
    y = brain["t2"]
    assert psnr(y + 0.1, y) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(psnr(y, y))
    m = brain["mask"]
    pert = y.copy()
    pert[~m] += 0.3  # outside the mask only
    for fn in (psnr, nmse, mae):
        assert fn(pert, y, mask=m) == pytest.approx(fn(y + 0.0, y, mask=m), abs=1e-12)
        assert fn(pert, y) != pytest.approx(fn(y, y))
    assert math.isnan(psnr(y, y, mask=np.zeros_like(m)))


def test_nmse_and_mae(brain):
    t1, t2, m = brain["t1"], brain["t2"], brain["mask"]
    assert nmse(np.zeros_like(t2), t2) == pytest.approx(1.0)
    assert nmse(t1, t2) == pytest.approx(np.sum((t1 - t2) ** 2) / np.sum(t2**2), rel=1e-12)
    assert nmse(t1, t2, mask=m) == pytest.approx(np.sum((t1[m] - t2[m]) ** 2) / np.sum(t2[m] ** 2), rel=1e-12)
    assert mae(t1, t2, mask=m) == pytest.approx(np.abs(t1[m] - t2[m]).mean(), rel=1e-12)
    assert math.isinf(nmse(np.ones(4), np.zeros(4)))
    assert math.isnan(nmse(np.zeros(4), np.zeros(4)))


def test_ssim3d_matches_monai_ssimmetric(brain):
    t1, t2 = brain["t1"], brain["t2"]
    x, y = torch.tensor(t1)[None, None], torch.tensor(t2)[None, None]
    ours = ssim3d(t1, t2)
    assert -0.5 < ours < 0.9 and abs(ours) > 0.05
    assert ours == pytest.approx(float(SSIMMetric(spatial_dims=3, data_range=1.0)(x, y)), abs=1e-4)
    assert ssim3d(t2, t2) == pytest.approx(1.0, abs=1e-12)
    crop = (slice(10, 58), slice(30, 78), slice(20, 68))
    xc, yc = x[(..., *crop)], y[(..., *crop)]
    ref_u = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="uniform", win_size=7)(xc, yc)
    ours_u = ssim3d(t1[crop], t2[crop], kernel="uniform", kernel_size=7)
    assert ours_u == pytest.approx(float(ref_u), abs=1e-4)
    assert abs(ours_u - ssim3d(t1[crop], t2[crop])) > 1e-3


def test_ssim3d_masked_is_mean_of_map_over_cropped_mask(brain):
    crop = (slice(30, 62), slice(38, 70), slice(59, 91))  # 32^3 across the top of the brain
    t1, t2, m = brain["t1"][crop], brain["t2"][crop], brain["mask"][crop]
    inner = m[5:-5, 5:-5, 5:-5]  # the valid map is smaller by the kernel radius on each side
    assert 0.2 < inner.mean() < 0.8
    x, y = torch.tensor(t1)[None, None], torch.tensor(t2)[None, None]
    smap32, _ = compute_ssim_and_cs(x, y, 3, [11] * 3, [1.5] * 3, data_range=1.0)
    # MONAI's formula and kernel evaluated in float64 (MONAI itself casts to float32)
    k = _gaussian_kernel(3, 1, [11] * 3, [1.5] * 3).double()
    mx, my, mxx, myy, mxy = (F.conv3d(v, k) for v in (x, y, x * x, y * y, x * y))
    c1, c2 = 0.01**2, 0.03**2
    smap64 = ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * (
        (2 * (mxy - mx * my) + c2) / (mxx - mx**2 + myy - my**2 + c2)
    )
    ours = ssim3d(t1, t2, mask=m)
    assert ours == pytest.approx(smap64[0, 0].numpy()[inner].mean(), abs=1e-4)
    assert ours == pytest.approx(smap32[0, 0].double().numpy()[inner].mean(), abs=5e-4)
    assert abs(ours - ssim3d(t1, t2)) > 1e-2
    # voxels farther than the kernel radius from the mask do not enter the masked SSIM ...
    far = ~ndimage.binary_dilation(m, structure=np.ones((11, 11, 11)))
    assert far.sum() > 100
    pert = t1.copy()
    pert[far] = 0.5
    assert ssim3d(pert, t2, mask=m) == pytest.approx(ours, abs=1e-12)
    assert ssim3d(pert, t2) != pytest.approx(ssim3d(t1, t2), abs=1e-4)
    # ... but voxels inside it do
    pert = t1.copy()
    pert[m] = np.clip(pert[m] + 0.2, 0, 1)
    assert abs(ssim3d(pert, t2, mask=m) - ours) > 1e-3


def test_ssim_per_slice_matches_skimage(brain):
    t1, t2 = brain["t1"], brain["t2"]
    res = ssim_per_slice(t1, t2, axis=-1)
    nonempty = [k for k in range(t2.shape[-1]) if np.any(t2[..., k] != 0)]
    assert res.count == len(nonempty) and list(res.indices) == nonempty
    ref = np.array([structural_similarity(t2[..., k], t1[..., k], data_range=1.0) for k in nonempty])
    np.testing.assert_allclose(res.values, ref, atol=1e-10)
    assert res.mean == pytest.approx(ref.mean())
    # an all-zero target slice is skipped and counted out
    t2z = t2.copy()
    t2z[:, 50, :] = 0
    res0 = ssim_per_slice(t1, t2z, axis=1)
    assert res0.count == ssim_per_slice(t1, t2, axis=1).count - 1 and 50 not in res0.indices
    ref1 = structural_similarity(t2z[:, 30, :], t1[:, 30, :], data_range=1.0)
    assert res0.values[list(res0.indices).index(30)] == pytest.approx(ref1, abs=1e-10)


def test_psnr_per_slice_matches_skimage_on_255_scale(brain):
    t1, t2 = brain["t1"], brain["t2"]
    res = psnr_per_slice(t1, t2, axis=0)
    ref = [peak_signal_noise_ratio(255 * t2[k], 255 * t1[k], data_range=255) for k in res.indices]
    np.testing.assert_allclose(res.values, ref, atol=1e-9)
    mse = [np.mean((t1[k] - t2[k]) ** 2) for k in res.indices]
    np.testing.assert_allclose(res.values, 10 * np.log10(1 / np.array(mse)), atol=1e-9)
    assert res.count == int(np.sum(np.any(t2 != 0, axis=(1, 2))))


def test_flat_ssim_matches_cldm_construction(brain):
    sl = (slice(20, 70), slice(30, 80), slice(30, 60))
    gt = np.stack([brain["t1"][sl], brain["t2"][sl], brain["pd"][sl]])  # (3, D, H, W) maps
    pred = np.stack([brain["t2"][sl], brain["pd"][sl], brain["t1"][sl]])
    # CLDM: transpose to (D, H, W, 3), reshape to (N_vox, 3), skimage SSIM with channel_axis=1
    g2 = np.moveaxis(gt, 0, -1).reshape(-1, 3)
    p2 = np.moveaxis(pred, 0, -1).reshape(-1, 3)
    r = g2.max() - g2.min()
    ref = structural_similarity(g2, p2, channel_axis=1, data_range=r)
    assert flat_ssim(pred, gt, channel_axis=0) == pytest.approx(ref, abs=1e-10)
    # one map, explicit data range
    assert flat_ssim(pred[0], gt[0], data_range=1.0) == pytest.approx(
        structural_similarity(gt[0].ravel(), pred[0].ravel(), data_range=1.0), abs=1e-10
    )
    assert flat_ssim(gt, gt, channel_axis=0) == pytest.approx(1.0)


def test_flat_ssim_global_statistics():
    rng = np.random.default_rng(0)
    y = rng.random(500)
    x = 0.7 * y + 0.1 * rng.random(500)
    c1, c2 = 0.01**2, 0.03**2
    cov = np.cov(x, y)  # sample (co)variances, ddof = 1
    ref = ((2 * x.mean() * y.mean() + c1) * (2 * cov[0, 1] + c2)) / (
        (x.mean() ** 2 + y.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)
    )
    assert flat_ssim(x, y, data_range=1.0, win_size=None) == pytest.approx(ref, rel=1e-12)
    assert flat_ssim(x, y, data_range=1.0, win_size=None) != pytest.approx(flat_ssim(x, y, data_range=1.0))


def test_pearson_r_sees_contrast_that_psnr_misses():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.3, 0.7, (16, 16, 8))
    mask = np.zeros_like(target, dtype=bool)
    mask[4:12, 4:12] = True
    flat = np.full_like(target, float(target[mask].mean()))  # the mean intensity: contrast lost
    inverted = 1.0 - target  # contrast reversed
    assert pearson_r(target, target, mask) == pytest.approx(1.0)
    assert pearson_r(inverted, target, mask) == pytest.approx(-1.0)
    assert np.isnan(pearson_r(flat, target, mask))  # constant prediction: undefined, never a pass
    noisy_flat = flat + rng.normal(0, 0.01, flat.shape)
    assert abs(pearson_r(noisy_flat, target, mask)) < 0.2
    assert psnr(noisy_flat, target, mask=mask) > psnr(0.5 * target + 0.6, target, mask=mask)  # PSNR prefers it
    assert pearson_r(0.5 * target + 0.6, target, mask) == pytest.approx(1.0)
    # the mask selects voxels: outside it the prediction may be anything
    anti = target.copy()
    anti[~mask] = 1.0 - target[~mask]
    assert pearson_r(anti, target, mask) == pytest.approx(1.0)
    assert pearson_r(anti, target) < 0.5
