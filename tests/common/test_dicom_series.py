"""DICOM series folders: uneven slice spacing and gantry tilt are explained, oblique series keep their geometry.

The series are small synthetic ones written here by ITK (one DICOM file per slice, positions and orientation in
the headers), read through :class:`common.transforms.validation.CheckedLoadImaged` as every bundle reads inputs.
"""

from __future__ import annotations

import locale
import warnings
from pathlib import Path

import itk
import numpy as np
import pytest

from common.transforms.validation import CheckedLoadImaged
from common.utils.dicom import series_geometry_warning


def write_series(folder: Path, positions, row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), spacing=0.8, size=24) -> Path:
    """One CT slice file per position (LPS, mm), all of one series, the given slice orientation.

    GDCM's writer sets the process locale to "C" and leaves it so: later subprocess output would then be decoded
    as ASCII in this pytest process. The locale is restored after writing."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(folder, positions, row, col, spacing, size)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder: Path, positions, row, col, spacing: float, size: int) -> Path:
    folder.mkdir(parents=True)
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    for i, p in enumerate(positions):
        arr = (np.random.default_rng(i).random((1, size, size)) * 1000 - 500).astype(np.int16)
        img = itk.image_from_array(arr)
        img.SetOrigin([float(v) for v in p])
        img.SetSpacing([spacing, spacing, 1.0])
        direction = np.stack([row, col, normal], axis=1)  # columns: the image axes in LPS
        img.SetDirection(itk.matrix_from_array(direction.copy()))
        md = img.GetMetaDataDictionary()
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.10.1", "0020|000e": "1.2.826.0.1.3680043.10.2",
            "0008|0018": f"1.2.826.0.1.3680043.10.3.{i + 1}", "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in p), "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *col)),
        }.items():
            md[tag] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(img)].New(Input=img, FileName=str(folder / f"slice_{i:03d}.dcm"), ImageIO=io).Update()
    return folder


def _load(folder: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = CheckedLoadImaged("image", image_only=True)({"image": str(folder)})["image"]
    return img, [str(w.message) for w in caught if "DICOM series" in str(w.message)]


def test_writing_a_series_leaves_the_process_locale_alone(tmp_path):
    before = locale.setlocale(locale.LC_ALL)
    write_series(tmp_path / "s", [(0.0, 0.0, 2.0 * k) for k in range(2)])
    assert locale.setlocale(locale.LC_ALL) == before


def test_uniform_axial_series_reads_without_warning(tmp_path):
    folder = write_series(tmp_path / "uniform", [(-10.0, -20.0, 5.0 * k) for k in range(6)])
    img, messages = _load(folder)
    assert messages == [] and series_geometry_warning(folder) is None
    assert tuple(img.shape) == (24, 24, 6)
    np.testing.assert_allclose(np.abs(np.diag(img.affine.numpy())[:3]), [0.8, 0.8, 5.0], atol=1e-4)


def test_non_uniform_spacing_is_explained_once_with_the_output_grid(tmp_path, capfd):
    zs = [0, 5, 10, 15, 22, 29, 36]  # a 7 mm stretch after four 5 mm gaps
    folder = write_series(tmp_path / "uneven", [(-10.0, -20.0, float(z)) for z in zs])
    img, messages = _load(folder)
    (message,) = messages
    assert f"'{folder}'" in message and "key 'image'" in message
    assert "gaps 5.00 to 7.00 mm between its 7 slices" in message
    assert "evenly at 6.00 mm" in message and "up to 3.00 mm" in message
    # the loaded grid is the one the message describes
    assert abs(abs(float(img.affine[2, 2])) - 6.0) < 1e-4 and img.shape[-1] == 7
    assert "Non uniform sampling" not in capfd.readouterr().err  # ITK's bare line is not repeated


def test_gantry_tilt_is_reported(tmp_path):
    tilt = np.tan(np.radians(15.0))
    folder = write_series(tmp_path / "tilt", [(-10.0, -20.0 + tilt * 4.0 * k, 4.0 * k) for k in range(6)])
    message = series_geometry_warning(folder)
    assert message is not None and "gantry tilt" in message and "about 15.0 degrees" in message
    assert "non-uniform" not in message


def test_oblique_series_keeps_its_geometry(tmp_path):
    a = np.radians(20.0)
    row, col = (1.0, 0.0, 0.0), (0.0, np.cos(a), np.sin(a))
    normal = np.cross(row, col)
    origin = np.array([-10.0, -20.0, 30.0])
    folder = write_series(tmp_path / "oblique", [origin + 3.0 * k * normal for k in range(5)], row=row, col=col)
    img, messages = _load(folder)
    assert messages == []
    # MONAI's affine is RAS: the LPS directions with x and y negated
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    aff = img.affine.numpy()
    np.testing.assert_allclose(aff[:3, 0], lps_to_ras @ np.asarray(row) * 0.8, atol=1e-4)
    np.testing.assert_allclose(aff[:3, 1], lps_to_ras @ np.asarray(col) * 0.8, atol=1e-4)
    np.testing.assert_allclose(aff[:3, 2], lps_to_ras @ normal * 3.0, atol=1e-4)
    np.testing.assert_allclose(aff[:3, 3], lps_to_ras @ origin, atol=1e-3)
