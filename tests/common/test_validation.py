"""Bad input meets one clear error naming the file: loaders, ValidateImaged, ValidateLabeld.

Every bad file is made from a real image (SPM's avg152T1 brain MRI, TotalSegmentator's example
CT and its segmentation, dipy's small DWI) and then broken the way user data breaks.
"""

from __future__ import annotations

import gzip
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd, LoadImaged

from common.data.fetch import demo_file
from common.transforms.validation import (
    CheckedLoadImaged,
    ValidateImaged,
    ValidateLabeld,
    load_nifti_checked,
)


@pytest.fixture(scope="module")
def brain():
    return nib.load(demo_file("spm/avg152T1.nii"))


@pytest.fixture(scope="module")
def ct():
    return nib.load(demo_file("totalsegmentator/example_ct.nii.gz"))


def _save(img, path):
    nib.save(img, str(path))
    return str(path)


def _load(path, **kw):
    return CheckedLoadImaged("image", ensure_channel_first=True, image_only=True, **kw)({"image": str(path)})


def _both_loaders_raise(path, exc, pattern):
    """CheckedLoadImaged and load_nifti_checked raise ``exc`` whose message names the file."""
    for load in (lambda: _load(path), lambda: load_nifti_checked(path, key="image")):
        with pytest.raises(exc) as info:
            load()
        msg = str(info.value)
        assert str(path) in msg and "'image'" in msg, msg
        assert re.search(pattern, msg), msg


# --------------------------------------------------------------------------------- file faults


def test_missing_file(tmp_path):
    _both_loaders_raise(tmp_path / "sub-01_T1w.nii.gz", FileNotFoundError, "does not exist")


def test_truncated_gzip(tmp_path, brain):
    good = _save(brain, tmp_path / "good.nii.gz")
    raw = open(good, "rb").read()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    _both_loaders_raise(cut, ValueError, "truncated gzip")
    # a file cut inside the header is caught before any reader runs
    (tmp_path / "stub.nii.gz").write_bytes(raw[:20])
    _both_loaders_raise(tmp_path / "stub.nii.gz", ValueError, "truncated gzip|too short")


def test_corrupt_gzip_stream(tmp_path, brain):
    raw = bytearray(open(_save(brain, tmp_path / "good.nii.gz"), "rb").read())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # a zeroed block inside the deflate stream
    bad = tmp_path / "scrambled.nii.gz"
    bad.write_bytes(bytes(raw))
    _both_loaders_raise(bad, ValueError, "corrupt gzip|truncated gzip")


def test_truncated_uncompressed_voxels(tmp_path):
    raw = open(demo_file("spm/avg152T1.nii"), "rb").read()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[: len(raw) // 2])
    _both_loaders_raise(cut, ValueError, "truncated voxel data")


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_truncated_gzip_each_reader(tmp_path, brain, reader):
    """ITK reads this half file without any error (zeros for the missing voxels): the default
    up-front gzip check is what stops it. With nibabel, the reader's own failure is also turned
    into the same clear error when that check is off."""
    raw = open(_save(brain, tmp_path / "good.nii.gz"), "rb").read()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    pattern = r"cut\.nii\.gz' \(key 'image'\) is a truncated gzip file"
    with pytest.raises(ValueError, match=pattern):
        CheckedLoadImaged("image", reader=reader, ensure_channel_first=True, image_only=True)({"image": str(cut)})
    if reader == "NibabelReader":
        load = CheckedLoadImaged("image", reader=reader, verify_gzip=False, ensure_channel_first=True, image_only=True)
        with pytest.raises(ValueError, match=pattern) as info:
            load({"image": str(cut)})
        assert isinstance(info.value.__cause__, EOFError)  # nibabel's own error is kept as the cause


def test_wrong_header_size_field(tmp_path):
    raw = bytearray(open(demo_file("spm/avg152T1.nii"), "rb").read())
    raw[0:4] = (12345).to_bytes(4, "little")  # nibabel would silently "fix" this and load
    bad = tmp_path / "badhdr.nii.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes(raw))
    _both_loaders_raise(bad, ValueError, r"sizeof_hdr\) is 12345, expected 348")


def test_wrong_magic_and_empty_file(tmp_path):
    raw = bytearray(open(demo_file("spm/avg152T1.nii"), "rb").read())
    raw[344:348] = b"xxxx"
    (tmp_path / "badmagic.nii").write_bytes(bytes(raw))
    _both_loaders_raise(tmp_path / "badmagic.nii", ValueError, "magic string")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _both_loaders_raise(tmp_path / "empty.nii.gz", ValueError, "empty")
    (tmp_path / "plain.nii.gz").write_bytes(raw)  # .gz name, not compressed, damaged magic
    _both_loaders_raise(tmp_path / "plain.nii.gz", ValueError, "magic string")


def test_singular_affine_refused(tmp_path):
    raw = bytearray(open(demo_file("spm/avg152T1.nii"), "rb").read())
    raw[254:256] = np.int16(2).tobytes()  # sform_code = 2: the affine is the sform rows
    for row in (280, 296, 312):  # srow_x, srow_y, srow_z: zero third column (a slice spacing of 0)
        raw[row + 8 : row + 12] = np.float32(0.0).tobytes()
    (tmp_path / "flat.nii").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"flat\.nii' \(key 'image'\) has a singular affine"):
        load_nifti_checked(tmp_path / "flat.nii", key="image")
    # MONAI's readers repair this header from the qform / voxel sizes; a MetaTensor whose affine
    # is singular anyway (e.g. built by a script) is refused by ValidateImaged
    d = _load(demo_file("spm/avg152T1.nii"))
    d["image"].affine[:3, 2] = 0
    with pytest.raises(ValueError, match=r"avg152T1\.nii' \(key 'image'\) has a singular affine"):
        ValidateImaged("image", channels=1)(d)


def test_good_file_loads_unchanged(tmp_path, brain):
    img = load_nifti_checked(demo_file("spm/avg152T1.nii"))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(brain.dataobj))
    np.testing.assert_allclose(img.affine, brain.affine)
    d = _load(demo_file("spm/avg152T1.nii"))
    assert tuple(d["image"].shape) == (1, 91, 109, 91)


# ----------------------------------------------------------------------- dimensionality, channels


def _validate(path, **kw):
    d = _load(path)
    return ValidateImaged("image", **kw)(d)


def test_2d_where_3d_expected(tmp_path, brain):
    sl = nib.Nifti1Image(np.asanyarray(brain.dataobj)[:, :, 45].copy(), brain.affine)
    path = _save(sl, tmp_path / "slice2d.nii.gz")
    with pytest.raises(ValueError, match=r"slice2d\.nii\.gz.*holds a 2D image.*expected a 3D image"):
        _validate(path, channels=1)
    one = nib.Nifti1Image(np.asanyarray(brain.dataobj)[:, :, 45:46].copy(), brain.affine)
    path = _save(one, tmp_path / "oneslice.nii.gz")
    with pytest.raises(ValueError, match=r"oneslice\.nii\.gz.*single slice \(a 2D image\) along axis 2"):
        _validate(path, channels=1)


def test_4d_where_3d_expected():
    path = demo_file("dipy/small_101D.nii.gz")
    with pytest.raises(
        ValueError, match=r"small_101D\.nii\.gz.*4D image with 102 volumes.*expected a 3D image \(1 channel\)"
    ):
        _validate(path, channels=1)


def test_3d_where_4d_dwi_expected():
    with pytest.raises(
        ValueError, match=r"avg152T1\.nii.*3D image \(one volume.*expected a 4D diffusion-weighted series"
    ):
        _validate(demo_file("spm/avg152T1.nii"), channels="dwi")
    d = _validate(demo_file("dipy/small_101D.nii.gz"), channels="dwi")  # the real DWI passes
    assert d["image"].shape[0] == 102


def test_wrong_channel_count(brain):
    d = _load(demo_file("spm/avg152T1.nii"))
    d["image"] = torch.cat([d["image"], d["image"]], 0)  # two modalities stacked where 3 are expected
    with pytest.raises(ValueError, match=r"avg152T1\.nii.*\(key 'image'\) has 2 channels.*expected 3"):
        ValidateImaged("image", channels={"image": 3})(d)


def test_channels_last_needs_ensure_channel_first():
    d = LoadImaged("image", image_only=True)({"image": demo_file("dipy/small_101D.nii.gz")})
    with pytest.raises(ValueError, match=r"small_101D\.nii\.gz.*channels last.*EnsureChannelFirstd"):
        ValidateImaged("image", channels="dwi")(d)
    out = ValidateImaged("image", channels="dwi", allow_channel_last_4d=True)(d)  # raw layout accepted on request
    assert out["image"] is d["image"]


# ---------------------------------------------------------------------------------- intensities


def test_nan_and_inf_are_counted():
    d = _load(demo_file("spm/avg152T1.nii"))
    d["image"][0, 10, 10, 10:13] = float("nan")
    d["image"][0, 20, 20, 20:22] = float("inf")
    with pytest.raises(ValueError, match=r"avg152T1\.nii.*has 3 NaN and 2 Inf voxels"):
        ValidateImaged("image", channels=1)(d)


def test_all_zero_volume(tmp_path, brain):
    path = _save(nib.Nifti1Image(np.zeros(brain.shape, np.float32), brain.affine), tmp_path / "blank.nii.gz")
    with pytest.raises(ValueError, match=r"blank\.nii\.gz.*is all-zero"):
        _validate(path, channels=1)
    d = _load(demo_file("spm/avg152T1.nii"))  # a missing modality: one channel of zeros
    d["image"] = torch.cat([d["image"], torch.zeros_like(d["image"])], 0)
    with pytest.raises(ValueError, match=r"avg152T1\.nii.*constant channel\(s\) \[1\] of 2"):
        ValidateImaged("image", channels=2)(d)


def test_extreme_intensities(tmp_path, ct):
    arr = np.asanyarray(ct.dataobj).astype(np.float32)
    arr[60, 50, 50:54] = 3.0e6  # raw scanner units / wrong rescale slope
    path = _save(nib.Nifti1Image(arr, ct.affine), tmp_path / "ct_badscale.nii.gz")
    with pytest.raises(ValueError, match=r"ct_badscale\.nii\.gz.*4 voxels with \|value\| > 100000 \(largest 3e\+06\)"):
        _validate(path, channels=1, max_abs=1e5)
    _validate(demo_file("totalsegmentator/example_ct.nii.gz"), channels=1, max_abs=1e5)  # the real CT passes


def test_oblique_anisotropic_affine_passes_unchanged(tmp_path, ct):
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.1, 3.5])  # oblique, anisotropic
    aff[:3, 3] = [-40.0, 12.5, 80.0]
    path = _save(nib.Nifti1Image(np.asanyarray(ct.dataobj), aff), tmp_path / "oblique.nii.gz")
    d = _load(path)
    before = d["image"].clone()
    out = ValidateImaged("image", channels=1, max_abs=1e5, min_spatial_size=32)(d)
    assert out["image"] is d["image"]
    torch.testing.assert_close(out["image"].as_tensor(), before.as_tensor())
    np.testing.assert_allclose(out["image"].affine.numpy(), nib.load(path).affine, atol=1e-5)


# ---------------------------------------------------------------------------------- size


def test_too_small_refused_or_padded_and_inverted():
    path = demo_file("dipy/small_101D.nii.gz")  # 6 x 10 x 10 voxels, 102 volumes
    with pytest.raises(
        ValueError, match=r"small_101D\.nii\.gz.*spatial size \(6, 10, 10\), smaller than the minimum \(16, 16, 16\)"
    ):
        _validate(path, channels="dwi", min_spatial_size=16)

    pre = Compose(
        [
            CheckedLoadImaged("image", ensure_channel_first=True, image_only=True),
            ValidateImaged("image", channels="dwi", min_spatial_size=(8, 8, 16), pad_small=True),
        ]
    )
    with pytest.warns(UserWarning, match=r"small_101D\.nii\.gz.*padded to \(8, 10, 16\)"):
        d = pre({"image": path})
    img = d["image"]
    assert tuple(img.shape) == (102, 8, 10, 16)
    assert float(img[:, 0].max()) == float(img.min())  # padded with the background (image minimum)
    # Invertd removes the padding from a prediction made on the padded grid
    d["pred"] = img.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    raw = LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": path})["image"]
    assert tuple(inv["pred"].shape) == (102, 6, 10, 10)
    torch.testing.assert_close(inv["pred"].as_tensor(), raw.as_tensor())


def test_validate_without_meta_names_the_key():
    with pytest.raises(ValueError, match=r"key 'image' has tensor shape \(1, 4, 4\) without a channel axis"):
        ValidateImaged("image")({"image": torch.ones(1, 4, 4)})
    with pytest.raises(ValueError, match=r"key 'image' has 5 dimensions .* expected a 3D image"):
        ValidateImaged("image")({"image": torch.ones(1, 1, 4, 4, 4)})
    with pytest.raises(ValueError, match=r"key 't2' is all-zero"):
        ValidateImaged("t2")({"t2": torch.zeros(1, 8, 8, 8)})


# ---------------------------------------------------------------------------------- labels


def test_labels_outside_class_set():
    seg_path = demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz")
    d = CheckedLoadImaged("label", ensure_channel_first=True, image_only=True)({"label": seg_path})
    n_max = int(d["label"].max())
    ValidateLabeld("label", num_classes=n_max + 1)(d)  # the real segmentation fits its own class set
    with pytest.raises(ValueError) as info:
        ValidateLabeld("label", num_classes=14)(d)
    msg = str(info.value)
    assert "example_seg_fast_force_split.nii.gz" in msg and "{0, ..., 13} (14 classes)" in msg
    assert re.search(r": 14 \(\d+ voxels\), 18 \(\d+ voxels\)", msg) and "more" in msg, msg
    d["label"] = d["label"].float() * 0.5  # an interpolated mask: non-integer values
    with pytest.raises(ValueError, match=r"example_seg_fast_force_split\.nii\.gz.*: 0\.5 \("):
        ValidateLabeld("label", num_classes=n_max + 1)(d)
