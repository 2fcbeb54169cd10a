"""Fusion metrics: hand-computed cases, the iVAN spec's properties and loop references on real slices."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.fetch import demo_file
from common.metrics import (
    QABF_CONSTANTS,
    average_gradient,
    entropy,
    fusion_metrics,
    piella_q,
    qabf,
    qmi,
    spatial_frequency,
)

QABF_IDENTICAL = 0.9994 / (1 + math.exp(-7.5)) * 0.9879 / (1 + math.exp(-4.4))  # = 0.9747936


def _slice01(key: str) -> np.ndarray:
    a = np.asarray(nib.load(demo_file(key)).dataobj, dtype=np.float64)[:, :, 46]
    return np.clip(a, 0.0, 1.0)  # axial slice 91 x 109 on [0, 1]


@pytest.fixture(scope="module")
def slices() -> dict[str, np.ndarray]:
    t1, t2 = _slice01("spm/avg152T1.nii"), _slice01("spm/avg152T2.nii")
    return {"t1": t1, "t2": t2, "avg": (t1 + t2) / 2}


# small image for hand computation (scale=1: values are already grey levels)
F3 = np.array([[0.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 4.0]])


def test_average_gradient_by_hand():
    # (i, j) = (0,0): dI=2, dJ=1; (0,1): 1, -1; (1,0): -2, 0; (1,1): -2, 0
    expected = (math.sqrt(5 / 2) + math.sqrt(2 / 2) + math.sqrt(4 / 2) + math.sqrt(4 / 2)) / 4
    assert average_gradient(F3, scale=1.0) == pytest.approx(expected, rel=1e-12)
    expected_no_half = (math.sqrt(5) + math.sqrt(2) + 2 + 2) / 4
    assert average_gradient(F3, variant="no_half", scale=1.0) == pytest.approx(expected_no_half, rel=1e-12)
    with pytest.raises(ValueError):
        average_gradient(F3, variant="other")


def test_average_gradient_ramp_non_square():
    i, j = np.meshgrid(np.arange(5), np.arange(9), indexing="ij")
    a, b = 3.0, 2.0
    ramp = a * i + b * j
    assert average_gradient(ramp, scale=1.0) == pytest.approx(math.sqrt((a * a + b * b) / 2), rel=1e-12)
    assert average_gradient(ramp.T, scale=1.0) == pytest.approx(math.sqrt((a * a + b * b) / 2), rel=1e-12)
    # [0, 1] inputs are scaled x255
    assert average_gradient(ramp / 255.0) == pytest.approx(average_gradient(ramp, scale=1.0), rel=1e-12)


def test_spatial_frequency_by_hand():
    # row differences (along j): 1, -1 | 0, 0 | 0, 4 -> 18; column differences: 2, -2 | 1, -2 | 2, 2 -> 21
    assert spatial_frequency(F3, scale=1.0) == pytest.approx(math.sqrt(18 / 9 + 21 / 9), rel=1e-12)
    assert spatial_frequency(np.full((4, 7), 0.3)) == 0.0
    assert spatial_frequency(torch.tensor(F3.T), scale=1.0) == pytest.approx(spatial_frequency(F3, scale=1.0))


def test_entropy_by_hand():
    # levels 0 (x4), 1 (x1), 2 (x3), 4 (x1)
    p = np.array([4, 1, 3, 1]) / 9
    assert entropy(F3, scale=1.0) == pytest.approx(float(-np.sum(p * np.log2(p))), rel=1e-12)
    assert entropy(np.full((5, 3), 0.42)) == 0.0
    all_levels = np.arange(256, dtype=np.float64).reshape(8, 32) / 255.0  # non-square, each level once
    assert entropy(all_levels) == pytest.approx(8.0, abs=1e-12)
    # grey-level histogram, not distinct floats: values rounding to the same level are one bin
    assert entropy(np.array([[0.1, 0.2], [0.3, 0.4]]), scale=1.0) == 0.0


def test_qmi_by_hand():
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    f = np.array([[0.0, 1.0], [0.0, 1.0]])  # independent of a, identical to b
    # MI(A,F) = 0, MI(B,F) = H(F) = 1 bit, H(B) + H(F) = 2 -> QMI = 2 (0 + 1/2) = 1
    assert qmi(a, f, f, scale=1.0) == pytest.approx(1.0, abs=1e-12)
    assert qmi(a, a, f, scale=1.0) == pytest.approx(0.0, abs=1e-12)


def test_identical_images_properties(slices):
    x = slices["t1"]
    assert qmi(x, x, x) == pytest.approx(2.0, abs=1e-12)
    assert qabf(x, x, x) == pytest.approx(0.9747936, abs=1e-7)
    assert qabf(x, x, x) == pytest.approx(QABF_IDENTICAL, abs=1e-12)
    assert piella_q(x, x, x) == pytest.approx(1.0, abs=1e-12)
    assert QABF_CONSTANTS["kappa_g"] == -15.0 and QABF_CONSTANTS["sigma_a"] == 0.8
    # an all-zero image has no edges (Sobel with zero padding): Q^AB/F undefined; flat windows give Q0 = 1
    z = np.zeros((12, 10))
    assert math.isnan(qabf(z, z, z))
    c = np.full((12, 10), 0.5)
    assert piella_q(c, c, c) == pytest.approx(1.0) and piella_q(z, z, z) == pytest.approx(1.0)
    assert piella_q(c, c, z) == pytest.approx(0.0)  # luminance term 2 m_x m_y / (m_x^2 + m_y^2) = 0


def test_fusion_of_real_slices_is_between_bounds(slices):
    t1, t2, avg = slices["t1"], slices["t2"], slices["avg"]
    m = fusion_metrics(t1, t2, avg)
    assert 0 < m["qabf"] < QABF_IDENTICAL and 0 < m["piella_q"] < 1 and 0 < m["qmi"] < 2
    assert 0 < m["en"] < 8 and m["ag"] > 0 and m["sf"] > 0
    # choosing one source as the fusion favours it over the other
    assert qabf(t1, t2, t1) > qabf(t1, t2, t2 * 0.3)
    # Q^AB/F and Piella's Q do not depend on the intensity scale; AG and SF scale linearly
    assert qabf(t1, t2, avg, scale=1.0) == pytest.approx(m["qabf"], rel=1e-10)
    assert piella_q(t1, t2, avg, scale=1.0) == pytest.approx(m["piella_q"], rel=1e-8)
    assert average_gradient(avg, scale=1.0) * 255 == pytest.approx(m["ag"], rel=1e-12)
    # tensors give the same values
    assert qmi(torch.tensor(t1), torch.tensor(t2), torch.tensor(avg)) == pytest.approx(m["qmi"])


def _qabf_loop(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Pixel-by-pixel Q^AB/F with explicit zero-padded Sobel sums (reference for the vectorised code)."""
    hx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    hy = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    m, n = a.shape

    def edges(x):
        xp = np.pad(x, 1)
        g = np.zeros_like(x)
        al = np.zeros_like(x)
        for i in range(m):
            for j in range(n):
                sx = sum(hx[u][v] * xp[i + u, j + v] for u in range(3) for v in range(3))
                sy = sum(hy[u][v] * xp[i + u, j + v] for u in range(3) for v in range(3))
                g[i, j] = math.hypot(sx, sy)
                al[i, j] = (math.pi / 2 if sy >= 0 else -math.pi / 2) if sx == 0 else math.atan(sy / sx)
        return g, al

    def q(gx, ax, gf, af):
        if gx == 0 and gf == 0:
            grel = 0.0
        else:
            grel = gf / gx if gx > gf else gx / gf
        arel = 1 - abs(ax - af) / (math.pi / 2)
        return 0.9994 / (1 + math.exp(-15 * (grel - 0.5))) * 0.9879 / (1 + math.exp(-22 * (arel - 0.8)))

    (ga, aa), (gb, ab), (gf, af) = edges(a), edges(b), edges(f)
    num = den = 0.0
    for i in range(m):
        for j in range(n):
            num += q(ga[i, j], aa[i, j], gf[i, j], af[i, j]) * ga[i, j]
            num += q(gb[i, j], ab[i, j], gf[i, j], af[i, j]) * gb[i, j]
            den += ga[i, j] + gb[i, j]
    return num / den


def _piella_loop(a: np.ndarray, b: np.ndarray, f: np.ndarray, k: int = 8) -> float:
    """Window-by-window Piella Q with np.var / np.cov (reference for the vectorised code)."""

    def q0(x, y):
        mx, my = x.mean(), y.mean()
        vx, vy = x.var(), y.var()
        cxy = np.mean((x - mx) * (y - my))
        return 4 * cxy * mx * my / ((vx + vy) * (mx * mx + my * my))

    vals = []
    for i in range(a.shape[0] - k + 1):
        for j in range(a.shape[1] - k + 1):
            wa, wb, wf = (z[i : i + k, j : j + k] for z in (a, b, f))
            sa, sb = wa.var(), wb.var()
            lam = sa / (sa + sb)
            vals.append(lam * q0(wa, wf) + (1 - lam) * q0(wb, wf))
    return float(np.mean(vals))


def test_qabf_and_piella_match_loop_references(slices):
    crop = (slice(30, 46), slice(40, 53))  # 16 x 13 patch of brain tissue (no flat windows)
    a, b, f = (slices[k][crop] * 255 for k in ("t1", "t2", "avg"))
    assert qabf(a, b, f, scale=1.0) == pytest.approx(_qabf_loop(a, b, f), rel=1e-10)
    assert piella_q(a, b, f, scale=1.0) == pytest.approx(_piella_loop(a, b, f), rel=1e-8)
    f2 = np.clip(f + np.random.default_rng(0).normal(0, 10, f.shape), 0, 255)
    assert qabf(a, b, f2, scale=1.0) == pytest.approx(_qabf_loop(a, b, f2), rel=1e-10)
    assert qabf(a, b, f2, scale=1.0) < qabf(a, b, f, scale=1.0)
