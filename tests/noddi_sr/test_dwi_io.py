"""FSL bval/bvec reading, shell binning and b0 normalisation on dipy's real gradient tables."""

import shutil

import numpy as np
import pytest

from common.data.dwi import GradientTableError, bin_shells, match_shells, normalise_b0, read_bvals_bvecs, write_bvals_bvecs
from common.data.fetch import demo_file


def test_reads_real_tables():
    t = read_bvals_bvecs(demo_file("dipy/small_101D.bval"), demo_file("dipy/small_101D.bvec"), n_volumes=102)
    assert t.bvals.shape == (102,) and t.bvecs.shape == (102, 3)
    dw = ~t.b0_mask
    np.testing.assert_allclose(np.linalg.norm(t.bvecs[dw], axis=1), 1.0, atol=1e-12)
    # small_64D stores a NaN vector for its b0: accepted, set to zero; N x 3 layout is transposed
    t64 = read_bvals_bvecs(demo_file("dipy/small_64D.bval"), demo_file("dipy/small_64D.bvec"), n_volumes=65)
    assert t64.b0_mask.sum() == 1 and np.all(t64.bvecs[t64.b0_mask] == 0) and np.all(np.isfinite(t64.bvecs))


def test_count_mismatch_names_the_file(tmp_path):
    bval, bvec = demo_file("dipy/small_25.bval"), demo_file("dipy/small_25.bvec")
    with pytest.raises(GradientTableError, match="26 b-values") as e:
        read_bvals_bvecs(bval, bvec, n_volumes=25)
    assert "small_25.bval" in str(e.value)
    # bval and bvec of different scans
    with pytest.raises(GradientTableError, match="small_64D.bvec"):
        read_bvals_bvecs(bval, demo_file("dipy/small_64D.bvec"))


def test_bad_vectors_raise(tmp_path):
    t = read_bvals_bvecs(demo_file("dipy/small_25.bval"), demo_file("dipy/small_25.bvec"))
    vec = t.bvecs.copy()
    vec[3] = np.nan
    write_bvals_bvecs(tmp_path / "a.bval", tmp_path / "a.bvec", t.bvals, vec)
    with pytest.raises(GradientTableError, match=r"non-finite.*\[3\]"):
        read_bvals_bvecs(tmp_path / "a.bval", tmp_path / "a.bvec")
    vec = t.bvecs.copy()
    vec[5] *= 2000.0  # a b-scaled vector is not a direction
    write_bvals_bvecs(tmp_path / "b.bval", tmp_path / "b.bvec", t.bvals, vec)
    with pytest.raises(GradientTableError, match="not unit length"):
        read_bvals_bvecs(tmp_path / "b.bval", tmp_path / "b.bvec")
    shutil.copy(demo_file("dipy/small_25.bvec"), tmp_path / "c.bvec")
    (tmp_path / "c.bval").write_text("0 1000 x\n")
    with pytest.raises(GradientTableError, match="c.bval"):
        read_bvals_bvecs(tmp_path / "c.bval", tmp_path / "c.bvec")


def test_write_read_round_trip(tmp_path):
    t = read_bvals_bvecs(demo_file("dipy/small_101D.bval"), demo_file("dipy/small_101D.bvec"))
    write_bvals_bvecs(tmp_path / "x.bval", tmp_path / "x.bvec", t.bvals, t.bvecs)
    u = read_bvals_bvecs(tmp_path / "x.bval", tmp_path / "x.bvec", n_volumes=102)
    np.testing.assert_array_equal(u.bvals, t.bvals)
    np.testing.assert_allclose(u.bvecs, t.bvecs, atol=1e-7)


def test_shell_binning_real_multishell():
    bvals = read_bvals_bvecs(demo_file("dipy/small_101D.bval"), demo_file("dipy/small_101D.bvec")).bvals
    shells = bin_shells(bvals, tolerance=100)
    assert shells[bvals <= 50].tolist() == [0.0]
    # every volume sits within the tolerance of its shell, and 1495..1585 form one shell (not 1500 and 1600)
    dw = bvals > 50
    assert np.all(np.abs(shells[dw] - bvals[dw]) <= 100)
    assert len(set(shells[(bvals > 1450) & (bvals < 1600)])) == 1
    values, counts = np.unique(shells[dw], return_counts=True)
    assert 8 <= values.size <= 14 and counts.sum() == 101


def test_match_shells_drops_and_raises():
    shells = np.array([0, 1000, 1000, 1000, 2000] + [2000] * 7 + [3000] * 6, dtype=float)
    with pytest.warns(UserWarning, match="b=1000 has 3 directions"):
        assert match_shells(shells, None) == [2000.0, 3000.0]
    with pytest.warns(UserWarning, match="ignored"):
        assert match_shells(shells, [2050]) == [2000.0]
    with pytest.raises(GradientTableError, match="expected shell b=1000"), pytest.warns(UserWarning):
        match_shells(shells, [1000, 2000])


def test_b0_normalisation():
    rng = np.random.default_rng(0)
    dwi = rng.uniform(10, 100, size=(4, 3, 2, 5)).astype(np.float32)
    dwi[0, 0, 0, :] = 0.0  # background voxel
    bvals = np.array([0, 1000, 5, 2000, 1000.0])
    e, s0 = normalise_b0(dwi, bvals)
    np.testing.assert_allclose(s0, dwi[..., [0, 2]].mean(-1), rtol=1e-6)
    assert np.all(e[0, 0, 0] == 0) and e.max() <= 1.5 and e.min() >= 0
    with pytest.raises(GradientTableError, match="no b0"):
        normalise_b0(dwi, np.full(5, 1000.0))
