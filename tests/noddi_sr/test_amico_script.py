"""The AMICO fitting script imports AMICO lazily; its ×2 upsampling lands on the bundle's HR grid."""

import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.noddi_phantom import hr_affine

SCRIPT = Path(__file__).resolve().parents[2] / "bundles" / "noddi_sr" / "scripts" / "fit_noddi_amico.py"


def _load():
    spec = importlib.util.spec_from_file_location("fit_noddi_amico", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lazy_import_and_upsampling(tmp_path):
    had_amico = "amico" in sys.modules
    mod = _load()
    assert ("amico" in sys.modules) == had_amico  # importing the script does not import AMICO
    aff = np.array([[-2.5, 0, 0, 100.0], [0, 2.5, 0, -120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    x = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 5, 4), np.float32) / 10  # linear ramp along i
    paths = []
    for k, name in enumerate(mod.MAP_NAMES):
        p = tmp_path / f"fit_{name}.nii.gz"
        nib.save(nib.Nifti1Image(x + 0.1 * k, aff), p)
        paths.append(p)
    out = nib.load(mod.upsample_maps(paths, tmp_path / "up.nii.gz", 2))
    assert out.shape == (12, 10, 8, 3)
    np.testing.assert_allclose(out.affine, hr_affine(aff), atol=1e-6)
    hr = out.get_fdata()
    # HR voxels 2i and 2i+1 sit at LR coordinates i - 1/4 and i + 1/4: the ramp is interpolated exactly inside
    np.testing.assert_allclose(hr[2:10, 0, 0, 0], (np.arange(2, 10) + 0.5) / 2 / 10 - 0.05, atol=1e-6)
    assert hr.min() >= 0 and hr.max() <= 1
