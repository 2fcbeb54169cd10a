"""SafeSaveImaged: SaveImaged's output, but no silent overwrite, no partial file, early folder check."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from monai.data import NibabelWriter
from monai.transforms import Compose, LoadImaged, Orientationd, SaveImaged, Spacingd

from common.data.fetch import demo_file
from common.transforms.saving import SafeSaveImaged


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def oblique_ct(tmp_path_factory):
    """The real example CT on an oblique, anisotropic grid (17 degree in-plane rotation, 0.8/1.1/3.5 mm)."""
    ct = nib.load(demo_file("totalsegmentator/example_ct.nii.gz"))
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.1, 3.5])
    aff[:3, 3] = [-40.0, 12.5, 80.0]
    path = tmp_path_factory.mktemp("in") / "case01_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), aff), str(path))
    return path


def _resampled(path):
    """Loaded, resampled to 2 mm isotropic and reoriented to RAS: the grid a network sees."""
    pre = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=2.0, mode="bilinear"),
        ]
    )
    return pre({"image": str(path)})


def test_written_file_has_input_geometry_and_matches_saveimaged(tmp_path, oblique_ct):
    d = _resampled(oblique_ct)
    assert not np.allclose(d["image"].affine.numpy(), nib.load(oblique_ct).affine)  # really resampled
    kw = dict(
        output_postfix="seg",
        resample=True,
        mode="nearest",
        output_dtype=np.int16,
        separate_folder=True,
        print_log=False,
    )
    SaveImaged("image", output_dir=str(tmp_path / "monai"), **kw)(dict(d))
    SafeSaveImaged("image", output_dir=str(tmp_path / "safe"), savepath_in_metadict=True, **kw)(d)

    assert _files(tmp_path / "monai") == _files(tmp_path / "safe") == ["case01_ct/case01_ct_seg.nii.gz"]
    out = tmp_path / "safe" / "case01_ct" / "case01_ct_seg.nii.gz"
    assert d["image"].meta["saved_to"] == str(out)  # the final name, not the temporary one
    written, ref, src = (
        nib.load(out),
        nib.load(tmp_path / "monai" / "case01_ct" / "case01_ct_seg.nii.gz"),
        nib.load(oblique_ct),
    )
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-4)  # the input's oblique, anisotropic grid
    assert written.shape == src.shape and written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(ref.dataobj))
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    src = demo_file("spm/avg152T1.nii")
    load = LoadImaged("image", ensure_channel_first=True, image_only=True)
    kw = dict(output_dir=str(tmp_path), output_postfix="pred", separate_folder=False, print_log=False)
    SafeSaveImaged("image", **kw)(load({"image": src}))
    out = tmp_path / "avg152T1_pred.nii.gz"
    before = out.read_bytes()

    d = load({"image": src})
    d["image"] = d["image"] * 0 + 7
    with pytest.raises(FileExistsError, match=r"avg152T1_pred\.nii\.gz' already exists; set 'overwrite' to true"):
        SafeSaveImaged("image", **kw)(d)
    assert out.read_bytes() == before and _files(tmp_path) == ["avg152T1_pred.nii.gz"]  # untouched, no temporary

    SafeSaveImaged("image", overwrite=True, **kw)(d)
    assert float(np.asanyarray(nib.load(out).dataobj).max()) == 7.0
    assert _files(tmp_path) == ["avg152T1_pred.nii.gz"]


def test_unwritable_output_folder_fails_at_construction(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(PermissionError, match=r"output folder '.*outputs/run1' cannot be written"):
        SafeSaveImaged("image", output_dir=str(blocker / "run1"))


class _DiskFullWriter(NibabelWriter):
    """Writes half of the file, then fails like a full disk."""

    def write(self, filename, verbose=False, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\x1f\x8b" + b"\x00" * 1000)
        raise OSError(28, "No space left on device")


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    d = LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": demo_file("spm/avg152T1.nii")})
    saver = SafeSaveImaged(
        "image", output_dir=str(tmp_path), output_postfix="pred", writer=_DiskFullWriter, print_log=False
    )
    with pytest.raises(RuntimeError, match=r"writing '.*avg152T1_pred\.nii\.gz' failed: .*No space left on device"):
        saver(d)
    assert _files(tmp_path) == []
    assert not any(name.endswith(".part.nii.gz") for _, _, names in os.walk(tmp_path) for name in names)


def test_output_stays_inside_output_dir_for_inputs_outside_data_root(tmp_path):
    """With data_root_dir, an input elsewhere must not be written next to itself (``../..`` paths)."""
    import nibabel as nib
    import numpy as np

    from common.transforms.saving import SafeSaveImaged
    from monai.transforms import LoadImaged

    outside = tmp_path / "elsewhere" / "case7"
    outside.mkdir(parents=True)
    src = outside / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])), str(src))
    data = LoadImaged(keys="image")({"image": str(src)})
    out = tmp_path / "out"
    SafeSaveImaged(keys="image", output_dir=str(out), output_postfix="seg", separate_folder=False,
                   data_root_dir=str(tmp_path / "dataset"))(data)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*_seg.nii.gz"))
    assert written == ["out/case7/image_seg.nii.gz"]


def test_spatial_shape_keeps_a_one_slice_axis(tmp_path):
    """MONAI's writer squeezes a one-slice volume to 2D; ``spatial_shape`` writes it with its slice axis, the same
    voxels and affine, and refuses a shape with another voxel count (nothing left behind)."""
    from monai.data import MetaTensor

    from common.transforms.saving import SafeSaveImage

    sl = nib.load(demo_file("totalsegmentator/example_ct.nii.gz")).slicer[:, :, 50:51]
    img = MetaTensor(np.asarray(sl.dataobj, dtype=np.float32)[None], affine=sl.affine,
                     meta={"original_channel_dim": "no_channel", "spatial_shape": np.asarray(sl.shape)})
    saver = SafeSaveImage(output_dir=str(tmp_path), output_ext=".nii.gz", resample=False, separate_folder=False,
                          print_log=False)
    saver(img, filename=str(tmp_path / "squeezed"))
    assert nib.load(str(tmp_path / "squeezed.nii.gz")).shape == sl.shape[:2]  # what the plain writer does
    saver(img, filename=str(tmp_path / "kept"), spatial_shape=sl.shape)
    kept = nib.load(str(tmp_path / "kept.nii.gz"))
    assert kept.shape == sl.shape
    np.testing.assert_allclose(kept.affine, sl.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kept.dataobj), np.asarray(sl.dataobj, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot write"):
        saver(img, filename=str(tmp_path / "wrong"), spatial_shape=(7, 7, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.nii.gz", "squeezed.nii.gz"]
