"""NODDI forward model against closed forms and an independent numerical integration over the sphere (spec §9)."""

import numpy as np
import pytest
from scipy.special import dawsn, erf, erfi

from common.data.noddi import (
    D_ISO,
    D_PAR,
    NODDIModel,
    extra_neurite_signal,
    intra_neurite_signal,
    kappa_to_odi,
    noddi_signal,
    odi_to_kappa,
    watson_hindered_diffusivities,
)


def _fibonacci_sphere(m):
    i = np.arange(m) + 0.5
    z = 1 - 2 * i / m
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


SPHERE = _fibonacci_sphere(300_000)  # equal-area points in the lab frame: an integration unrelated to the model's


def _watson_density(kappa, mu):
    """Watson density on SPHERE with the analytic normaliser 4π·1F1(½; 3/2; κ) = 4π·e^κ·F(√κ)/√κ."""
    t = SPHERE @ mu
    if kappa == 0:
        return np.full(len(SPHERE), 1 / (4 * np.pi))
    return np.exp(kappa * (t * t - 1)) * np.sqrt(kappa) / (4 * np.pi * dawsn(np.sqrt(kappa)))


def _independent_signal(b, g, mu, ndi, odi, fwf):
    kappa = float(odi_to_kappa(odi))
    w = _watson_density(kappa, mu) * 4 * np.pi / len(SPHERE)
    e_ic = np.sum(w * np.exp(-b * D_PAR * (SPHERE @ g) ** 2))
    # extra-neurite: Watson average of the cylinder tensor d_perp I + (d_par - d_perp) n n^T, then exp(-b g^T D g)
    d_perp = D_PAR * (1 - ndi)
    tensor = d_perp * np.eye(3) + (D_PAR - d_perp) * np.einsum("n,ni,nj->ij", w, SPHERE, SPHERE)
    e_ec = np.exp(-b * g @ tensor @ g)
    return (1 - fwf) * (ndi * e_ic + (1 - ndi) * e_ec) + fwf * np.exp(-b * D_ISO)


def test_against_independent_sphere_integration():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=3)
    mu /= np.linalg.norm(mu)
    worst = 0.0
    for ndi, odi, fwf in [(0.7, 0.03, 0.0), (0.4, 0.15, 0.1), (0.6, 0.5, 0.3), (0.2, 0.9, 0.05)]:
        bvals = np.array([0.0, 700.0, 1000.0, 2000.0, 3000.0])
        g = rng.normal(size=(5, 3))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        g[2] = mu  # parallel and perpendicular directions included
        g[3] = np.cross(mu, g[3]) / np.linalg.norm(np.cross(mu, g[3]))
        ours = noddi_signal(ndi, odi, fwf, mu[None], bvals, g)[0]
        table = NODDIModel(bvals, g)(ndi, odi, fwf, mu[None])[0]
        ref = np.array([_independent_signal(b, gi, mu, ndi, odi, fwf) for b, gi in zip(bvals, g)])
        worst = max(worst, np.abs(ours - ref).max())
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        np.testing.assert_allclose(table, ref, atol=1e-4)
    assert worst < 1e-4


def test_special_cases():
    b = np.array([0.0, 1000.0, 2000.0, 3000.0])
    g = np.tile([[0.0, 0.0, 1.0]], (4, 1))
    # f_iso = 1: pure free water; b = 0: 1
    np.testing.assert_allclose(noddi_signal(0.5, 0.3, 1.0, [[1, 0, 0]], b, g)[0], np.exp(-b * 3e-3), atol=1e-12)
    np.testing.assert_allclose(noddi_signal(0.5, 0.3, 0.2, [[1, 0, 0]], b[:1], g[:1])[0], 1.0, atol=1e-12)
    # kappa = 0 (ODI = 1): isotropic sticks, E_ic = sqrt(pi) erf(sqrt(b d)) / (2 sqrt(b d))
    for bb in (1000.0, 3000.0):
        x = np.sqrt(bb * D_PAR)
        expected = np.sqrt(np.pi) * erf(x) / (2 * x)
        assert abs(intra_neurite_signal(bb, 0.0, 0.3) - expected) < 1e-4


def test_antipodal_symmetry_and_low_dispersion_limit():
    rng = np.random.default_rng(1)
    c = rng.uniform(-1, 1, 10)
    np.testing.assert_allclose(intra_neurite_signal(2000, 5.0, c), intra_neurite_signal(2000, 5.0, -c), atol=1e-14)
    b = 2000.0
    par = [intra_neurite_signal(b, odi_to_kappa(o), 1.0) for o in (0.3, 0.1, 0.03, 0.01)]
    perp = [intra_neurite_signal(b, odi_to_kappa(o), 0.0) for o in (0.3, 0.1, 0.03, 0.01)]
    assert np.all(np.diff(par) < 0) and np.all(np.diff(perp) > 0)  # monotone towards the stick limits
    assert abs(par[-1] - np.exp(-b * D_PAR)) < 0.01 and abs(perp[-1] - 1) < 0.05


def test_watson_hindered_diffusivities():
    dperp = D_PAR * (1 - 0.6)
    kappas = np.array([0.0, 1e-7, 1e-5, 0.3, 2.0, 16.0, 64.0])
    dpw, dqw = watson_hindered_diffusivities(kappas, D_PAR, dperp)
    np.testing.assert_allclose(dpw + 2 * dqw, D_PAR + 2 * dperp, rtol=1e-12)  # trace preserved
    # the spec's closed form (Zhang 2012) written independently with erfi
    delta = D_PAR - dperp
    for k in (0.3, 2.0, 16.0):
        dawson = 0.5 * np.sqrt(np.pi) * np.exp(-k) * erfi(np.sqrt(k))
        r = np.sqrt(k) / dawson
        a, c = watson_hindered_diffusivities(k, D_PAR, dperp)
        assert abs(a - (-delta + 2 * dperp * k + delta * r) / (2 * k)) < 1e-15
        assert abs(c - (delta + 2 * (D_PAR + dperp) * k - delta * r) / (4 * k)) < 1e-15
    # series and closed form agree at the switch point
    k = 1e-5
    series = (D_PAR + 2 * dperp) / 3 + 4 * delta * k / 45 + 8 * delta * k**2 / 945
    sk = np.sqrt(k)
    closed = (-delta + 2 * dperp * k + delta * sk / dawsn(sk)) / (2 * k)
    assert abs(series - closed) < 1e-9
    assert abs(float(watson_hindered_diffusivities(k * 0.999, D_PAR, dperp)[0]) - closed) < 1e-9
    # kappa -> infinity: the cylinder itself
    a, c = watson_hindered_diffusivities(1e8, D_PAR, dperp)
    assert abs(a - D_PAR) < 1e-10 and abs(c - dperp) < 1e-10
    # tortuosity inside the extra-neurite signal: g perpendicular, no dispersion -> exp(-b d_par (1 - nu))
    e = extra_neurite_signal(1000.0, 1e8, 0.0, 0.6)
    assert abs(e - np.exp(-1000 * D_PAR * 0.4)) < 1e-8


def test_odi_kappa_round_trip():
    odi = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(kappa_to_odi(odi_to_kappa(odi)), odi, atol=1e-12)
    assert kappa_to_odi(0.0) == pytest.approx(1.0)

