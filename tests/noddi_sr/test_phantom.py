"""Semi-synthetic phantom: shapes, affines, signal-domain degradation, noise level and determinism."""

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.noddi_phantom import (
    PhantomConfig,
    acquisition_scheme,
    block_average,
    build_phantom_cohort,
    hr_affine,
    load_priors,
    lr_affine,
    make_subject,
    subject_snr,
)

TINY = PhantomConfig(hr_spacing=5.0, hr_shape=(32, 32, 32), scheme="dipy_small_101D")


@pytest.fixture(scope="module")
def priors():
    return load_priors("spm_oldseg")


def test_subject_shapes_ranges_and_affines(priors):
    s = make_subject(0, seed=3, cfg=TINY, priors=priors)
    assert s["noddi_hr"].shape == (3, 32, 32, 32) and s["dwi_lr"].shape == (102, 16, 16, 16)
    assert s["noddi_hr"].min() >= 0 and s["noddi_hr"].max() <= 1
    m = s["mask_hr"].astype(bool)
    assert 0.2 < m.mean() < 0.9 and np.all(s["noddi_hr"][:, ~m] == 0)
    assert s["wm_hr"].sum() > 100 and s["gm_hr"].sum() > 100 and not np.any(s["wm_hr"] & s["gm_hr"])
    # the real tissue priors give WM a higher NDI and a lower ODI than GM
    ndi, odi = s["noddi_hr"][0], s["noddi_hr"][1]
    wm, gm = s["wm_hr"] > 0, s["gm_hr"] > 0
    assert ndi[wm].mean() > ndi[gm].mean() + 0.1 and odi[wm].mean() < odi[gm].mean() - 0.2
    np.testing.assert_allclose(np.abs(np.diag(s["affine_hr"][:3, :3])), 5.0)
    # LR voxel centre = mean of its 8 HR voxel centres; hr_affine inverts lr_affine
    a_hr, a_lr = s["affine_hr"], s["affine_lr"]
    hr_centres = [a_hr @ np.array([i, j, k, 1.0]) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    np.testing.assert_allclose(a_lr @ np.array([0, 0, 0, 1.0]), np.mean(hr_centres, axis=0), atol=1e-9)
    np.testing.assert_allclose(hr_affine(lr_affine(a_hr)), a_hr, atol=1e-12)


def test_lr_is_block_average_of_hr_signals_and_noise_level(priors):
    clean = make_subject(1, seed=0, cfg=PhantomConfig(**{**TINY.__dict__, "snr": None}), priors=priors)
    np.testing.assert_allclose(clean["dwi_lr"], block_average(clean["dwi_hr"].astype(np.float64)), rtol=1e-5, atol=1e-3)
    assert clean["dwi_lr"][:, 7, 7, 7] == pytest.approx(clean["dwi_hr"][:, 14:16, 14:16, 14:16].mean(axis=(1, 2, 3)), rel=1e-5)
    noisy = make_subject(1, seed=0, cfg=PhantomConfig(**{**TINY.__dict__, "snr": 20.0}), priors=priors)
    sigma = 700.0 / 20.0
    assert float(noisy["sigma"]) == pytest.approx(sigma)
    # background (S = 0): Rician magnitude of pure noise has mean sigma * sqrt(pi / 2)
    bg = noisy["dwi_lr"][:, clean["dwi_lr"][0] == 0]
    assert bg.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)


def test_same_seed_same_data_other_seed_other_data(priors):
    a = make_subject(0, seed=7, cfg=TINY, priors=priors)
    b = make_subject(0, seed=7, cfg=TINY, priors=priors)
    c = make_subject(1, seed=7, cfg=TINY, priors=priors)
    for k in ("noddi_hr", "dwi_lr", "fibre_dir_hr"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["noddi_hr"], c["noddi_hr"])


def test_schemes():
    b, g = acquisition_scheme("default")
    assert (b == 0).sum() == 6 and (b == 1000).sum() == 30 and (b == 2000).sum() == 60
    np.testing.assert_allclose(np.linalg.norm(g[b > 0], axis=1), 1.0)
    b, _ = acquisition_scheme("hcp")
    assert b.size == 288


def test_cohort_files_and_datalist(tmp_path, priors):
    path = build_phantom_cohort(tmp_path, n_train=1, n_val=0, n_test=1, seed=0, cfg=TINY)
    dl = json.loads(path.read_text())
    assert len(dl["training"]) == 1 and len(dl["test"]) == 1 and dl["testing"][0]["dwi"] == "phantom_001/dwi_lr.nii.gz"
    entry = dl["training"][0]
    dwi = nib.load(tmp_path / entry["dwi"])
    maps = nib.load(tmp_path / entry["noddi"])
    assert dwi.shape == (16, 16, 16, 102) and maps.shape == (32, 32, 32, 3)
    np.testing.assert_allclose(dwi.affine, lr_affine(maps.affine), atol=1e-5)
    for k in ("mask", "mask_hr", "wm", "gm", "bval", "bvec"):
        assert (tmp_path / entry[k]).is_file()
    again = build_phantom_cohort(tmp_path / "again", n_train=1, n_val=0, n_test=1, seed=0, cfg=TINY)
    np.testing.assert_array_equal(
        nib.load(again.parent / entry["dwi"]).get_fdata(), dwi.get_fdata()
    )


def test_snr_range_per_subject_and_other_fields_unchanged(priors):
    ranged = PhantomConfig(**{**TINY.__dict__, "snr_range": (15.0, 40.0)})
    snrs = [subject_snr(i, 0, ranged) for i in range(8)]
    assert all(15.0 <= s <= 40.0 for s in snrs) and len(set(snrs)) == 8  # one draw per subject
    assert subject_snr(3, 0, ranged) == snrs[3]  # a function of (seed, index)
    a = make_subject(3, seed=0, cfg=ranged, priors=priors)
    b = make_subject(3, seed=0, cfg=PhantomConfig(**{**TINY.__dict__, "snr": snrs[3]}), priors=priors)
    # the SNR has its own stream: maps, fibres and noise equal those of the fixed-SNR subject with that SNR
    for k in ("noddi_hr", "fibre_dir_hr", "dwi_lr"):
        np.testing.assert_array_equal(a[k], b[k])
    assert float(a["sigma"]) == pytest.approx(700.0 / snrs[3]) and float(a["snr"]) == snrs[3]
    with pytest.raises(ValueError, match="snr_range"):
        subject_snr(0, 0, PhantomConfig(snr_range=(40.0, 15.0)))


def test_cohort_workers_write_the_same_files(tmp_path):
    cfg = PhantomConfig(**{**TINY.__dict__, "snr_range": (15.0, 40.0)})
    one = build_phantom_cohort(tmp_path / "one", n_train=1, n_val=0, n_test=1, seed=2, cfg=cfg)
    two = build_phantom_cohort(tmp_path / "two", n_train=1, n_val=0, n_test=1, seed=2, cfg=cfg, n_jobs=2)
    d1, d2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert d1["training"] == d2["training"] and d1["subject_snr"] == d2["subject_snr"]
    assert set(d1["subject_snr"]) == {"phantom_000", "phantom_001"}
    for e in d1["training"] + d1["test"]:
        np.testing.assert_array_equal(nib.load(one.parent / e["dwi"]).get_fdata(), nib.load(two.parent / e["dwi"]).get_fdata())
