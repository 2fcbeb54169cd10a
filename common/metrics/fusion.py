"""No-reference and source-referenced image-fusion metrics (``ivan_fusion`` spec §6).

All functions work on single 2D images ``(M, N)`` (``M`` rows indexed by ``i``, ``N`` columns
indexed by ``j``; any ``M, N``, not only square), given as NumPy arrays or PyTorch tensors, and
return a Python ``float``. ``F`` is the fused image, ``A`` and ``B`` the two source images.

Intensity scale: the bundles keep images on ``[0, 1]``; the metrics are defined on the 8-bit scale
``[0, 255]``, so every image is multiplied by ``scale`` (default 255) first. Pass ``scale=1`` for
images already on ``[0, 255]``. AG and SF scale linearly with intensity, EN and QMI quantise the
scaled image to ``uint8`` (values clipped to ``[0, 255]`` and rounded half up), Q^AB/F and
Piella's Q are invariant to a common scale.

Definitions (the spec's, with the sources of the method description):

* AG, average gradient, ``1/((M-1)(N-1)) sum_{i<M-1, j<N-1} sqrt(((F(i+1,j) - F(i,j))^2 +
  (F(i,j+1) - F(i,j))^2) / 2)``; ``variant="no_half"`` omits the ``/2`` as the iVAN method
  description writes it.
* SF, spatial frequency (Eskicioglu & Fisher 1995), ``sqrt(RF^2 + CF^2)`` with
  ``RF^2 = 1/(MN) sum_i sum_{j>=1} (F(i,j) - F(i,j-1))^2`` and ``CF^2`` likewise along ``i``.
* EN, Shannon entropy (bits) of the normalised 256-bin histogram of the ``uint8`` image.
* QMI, normalised mutual information (Hossny et al. 2008),
  ``2 [MI(A,F)/(H(A)+H(F)) + MI(B,F)/(H(B)+H(F))]`` from 256x256 joint histograms.
* Q^AB/F (Xydeas & Petrovic, "Objective image fusion performance measure", Electronics Letters
  36(4), 2000) with Sobel edges and the constants of the spec.
* Q (Piella & Heijmans, "A new quality metric for image fusion", ICIP 2003), the
  variance-weighted universal image quality index (Wang & Bovik 2002) in 8x8 sliding windows.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import correlate

__all__ = [
    "QABF_CONSTANTS",
    "average_gradient",
    "spatial_frequency",
    "entropy",
    "qmi",
    "qabf",
    "piella_q",
    "fusion_metrics",
]

ArrayLike = np.ndarray | torch.Tensor

#: Gamma, kappa and sigma of the edge-strength (g) and orientation (alpha) sigmoids of Q^AB/F.
QABF_CONSTANTS: dict[str, float] = {
    "gamma_g": 0.9994,
    "kappa_g": -15.0,
    "sigma_g": 0.5,
    "gamma_a": 0.9879,
    "kappa_a": -22.0,
    "sigma_a": 0.8,
}

_SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])  # vertical gradient (along i)
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])  # horizontal gradient (along j)


def _image(x: ArrayLike, scale: float) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"fusion metrics expect a 2D image (M, N), got shape {a.shape}.")
    return a * float(scale)


def _images(scale: float, *xs: ArrayLike) -> list[np.ndarray]:
    out = [_image(x, scale) for x in xs]
    if any(o.shape != out[0].shape for o in out):
        raise ValueError(f"images must have the same shape, got {[o.shape for o in out]}.")
    return out


def _uint8(a: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and round half up to integer levels (as a uint8 cast of the scaled image)."""
    return np.floor(np.clip(a, 0.0, 255.0) + 0.5).astype(np.int64)


def _entropy_of(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p))) + 0.0  # + 0.0 turns -0.0 into 0.0


def average_gradient(image: ArrayLike, variant: str = "standard", scale: float = 255.0) -> float:
    """Average gradient AG of an image (larger = sharper).

    Args:
        image: 2D image ``(M, N)``, ``M, N >= 2``.
        variant: ``"standard"`` (with the ``/2`` inside the root) or ``"no_half"`` (without).
        scale: intensity multiplier applied first (255 maps ``[0, 1]`` to ``[0, 255]``).

    Returns:
        AG; for the ramp ``F(i, j) = a i + b j`` it is ``sqrt((a^2 + b^2) / 2)`` (standard).
    """
    f = _image(image, scale)
    if min(f.shape) < 2:
        raise ValueError(f"AG needs at least 2x2 pixels, got {f.shape}.")
    di = f[1:, :-1] - f[:-1, :-1]  # F(i+1, j) - F(i, j)
    dj = f[:-1, 1:] - f[:-1, :-1]  # F(i, j+1) - F(i, j)
    if variant == "standard":
        g = np.sqrt((di**2 + dj**2) / 2.0)
    elif variant == "no_half":
        g = np.sqrt(di**2 + dj**2)
    else:
        raise ValueError(f"variant must be 'standard' or 'no_half', got {variant!r}.")
    return float(g.mean())


def spatial_frequency(image: ArrayLike, scale: float = 255.0) -> float:
    """Spatial frequency SF = sqrt(RF^2 + CF^2), both normalised by ``M N``; 0 for a constant image.

    Args:
        image: 2D image ``(M, N)``.
        scale: intensity multiplier applied first.
    """
    f = _image(image, scale)
    mn = f.size
    rf2 = np.sum((f[:, 1:] - f[:, :-1]) ** 2) / mn  # row frequency: differences along j
    cf2 = np.sum((f[1:, :] - f[:-1, :]) ** 2) / mn  # column frequency: differences along i
    return float(np.sqrt(rf2 + cf2))


def entropy(image: ArrayLike, scale: float = 255.0) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of the ``uint8`` image.

    Uses the grey-level histogram, not the distinct float values (``ivan_fusion`` spec §8.6).
    0 for a constant image, 8 when all 256 levels are equally frequent.

    Args:
        image: 2D image ``(M, N)``.
        scale: intensity multiplier applied before quantisation.
    """
    q = _uint8(_image(image, scale))
    hist = np.bincount(q.ravel(), minlength=256).astype(np.float64)
    return _entropy_of(hist / hist.sum())


def _mutual_information(x: np.ndarray, f: np.ndarray) -> tuple[float, float, float]:
    """MI(X, F), H(X), H(F) in bits from the 256x256 joint histogram of two uint8-level images."""
    joint = np.bincount((x * 256 + f).ravel(), minlength=256 * 256).astype(np.float64).reshape(256, 256)
    joint /= joint.sum()
    px, pf = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log2(joint[nz] / np.outer(px, pf)[nz])))
    return mi, _entropy_of(px), _entropy_of(pf)


def qmi(image_a: ArrayLike, image_b: ArrayLike, fused: ArrayLike, scale: float = 255.0) -> float:
    """Normalised mutual information Q_MI of a fusion; 2 when ``F = A = B`` (non-constant).

    ``QMI = 2 [MI(A,F)/(H(A)+H(F)) + MI(B,F)/(H(B)+H(F))]`` with
    ``MI(X,F) = sum p_XF log2(p_XF / (p_X p_F))`` from the 256x256 joint histogram of the ``uint8``
    images and ``H`` the marginal entropies. A term whose entropies are both 0 (two constant
    images) is 0/0 and makes the result NaN.

    Args:
        image_a: source A ``(M, N)``.
        image_b: source B ``(M, N)``.
        fused: fused image F ``(M, N)``.
        scale: intensity multiplier applied before quantisation.
    """
    a, b, f = (_uint8(x) for x in _images(scale, image_a, image_b, fused))
    mi_af, h_a, h_f = _mutual_information(a, f)
    mi_bf, h_b, _ = _mutual_information(b, f)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(2.0 * (np.float64(mi_af) / (h_a + h_f) + np.float64(mi_bf) / (h_b + h_f)))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength g and orientation alpha (Sobel, zero padding outside the image)."""
    sx = correlate(x, _SOBEL_X, mode="constant", cval=0.0)
    sy = correlate(x, _SOBEL_Y, mode="constant", cval=0.0)
    g = np.sqrt(sx**2 + sy**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(sx == 0, np.where(sy < 0, -np.pi / 2, np.pi / 2), np.arctan(sy / np.where(sx == 0, 1, sx)))
    return g, alpha


def _edge_preservation(g_x: np.ndarray, a_x: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    """Q^{XF}: product of the sigmoids of relative edge strength and orientation preservation."""
    c = QABF_CONSTANTS
    with np.errstate(divide="ignore", invalid="ignore"):
        g_rel = np.where(g_x > g_f, g_f / g_x, g_x / g_f)
    g_rel = np.where((g_x == 0) & (g_f == 0), 0.0, g_rel)
    a_rel = 1.0 - np.abs(a_x - a_f) / (np.pi / 2)
    q_g = c["gamma_g"] / (1.0 + np.exp(c["kappa_g"] * (g_rel - c["sigma_g"])))
    q_a = c["gamma_a"] / (1.0 + np.exp(c["kappa_a"] * (a_rel - c["sigma_a"])))
    return q_g * q_a


def qabf(image_a: ArrayLike, image_b: ArrayLike, fused: ArrayLike, scale: float = 255.0) -> float:
    """Xydeas-Petrovic edge-transfer metric Q^AB/F in ``[0, 1)``.

    Per image: Sobel responses ``s_x`` (kernel ``[[-1,0,1],[-2,0,2],[-1,0,1]]``) and ``s_y``
    (``[[1,2,1],[0,0,0],[-1,-2,-1]]``), correlation with zero padding; ``g = sqrt(s_x^2 + s_y^2)``,
    ``alpha = arctan(s_y / s_x)`` (``s_x = 0`` gives ``+pi/2``, or ``-pi/2`` if ``s_y < 0``). For
    X in {A, B}: ``G^XF = g_F/g_X if g_X > g_F else g_X/g_F`` (0 if both are 0),
    ``A^XF = 1 - |alpha_X - alpha_F| / (pi/2)``,
    ``Q^XF = Gamma_g/(1 + exp(kappa_g (G^XF - sigma_g))) * Gamma_a/(1 + exp(kappa_a (A^XF - sigma_a)))``
    with :data:`QABF_CONSTANTS`, and
    ``Q^AB/F = sum(Q^AF g_A + Q^BF g_B) / sum(g_A + g_B)`` (weights ``w = g^L``, ``L = 1``).
    For ``F = A = B`` every pixel with an edge scores
    ``0.9994/(1 + e^-7.5) * 0.9879/(1 + e^-4.4) = 0.9747936``, which is then the value.

    Args:
        image_a: source A ``(M, N)``.
        image_b: source B ``(M, N)``.
        fused: fused image F ``(M, N)``.
        scale: intensity multiplier (does not change the result).

    Returns:
        Q^AB/F; NaN if neither source has an edge.
    """
    a, b, f = _images(scale, image_a, image_b, fused)
    g_a, al_a = _sobel(a)
    g_b, al_b = _sobel(b)
    g_f, al_f = _sobel(f)
    q_af = _edge_preservation(g_a, al_a, g_f, al_f)
    q_bf = _edge_preservation(g_b, al_b, g_f, al_f)
    den = float(np.sum(g_a + g_b))
    if den == 0.0:
        return float("nan")
    return float(np.sum(q_af * g_a + q_bf * g_b) / den)


def _window_stats(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population variance of every ``k x k`` window (stride 1, fully inside the image)."""
    mean = sliding_window_view(x, (k, k)).mean(axis=(-2, -1))
    var = sliding_window_view(x * x, (k, k)).mean(axis=(-2, -1)) - mean**2
    win = sliding_window_view(x, (k, k))
    constant = win.max(axis=(-2, -1)) == win.min(axis=(-2, -1))
    var = np.where(constant, 0.0, np.maximum(var, 0.0))  # exact zero for flat windows
    return mean, var


def _window_cov(x: np.ndarray, y: np.ndarray, mx: np.ndarray, my: np.ndarray, vx: np.ndarray, vy: np.ndarray, k: int):
    cov = sliding_window_view(x * y, (k, k)).mean(axis=(-2, -1)) - mx * my
    return np.where((vx == 0) | (vy == 0), 0.0, cov)


def _uiqi(mx: np.ndarray, my: np.ndarray, vx: np.ndarray, vy: np.ndarray, cxy: np.ndarray) -> np.ndarray:
    """Universal image quality index Q0 per window, ``4 s_xy m_x m_y / ((s_x^2 + s_y^2)(m_x^2 + m_y^2))``.

    Degenerate windows follow the factorisation ``Q0 = corr * luminance * contrast`` with an
    undefined factor taken as 1 (Wang & Bovik's reference code): both flat -> luminance term
    ``2 m_x m_y / (m_x^2 + m_y^2)``; both means 0 -> ``2 s_xy / (s_x^2 + s_y^2)``; both -> 1.
    """
    d1 = vx + vy
    d2 = mx**2 + my**2
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(
            (d1 > 0) & (d2 > 0),
            4.0 * cxy * mx * my / (d1 * d2),
            np.where(d1 > 0, 2.0 * cxy / d1, np.where(d2 > 0, 2.0 * mx * my / d2, 1.0)),
        )
    return q


def piella_q(image_a: ArrayLike, image_b: ArrayLike, fused: ArrayLike, window: int = 8, scale: float = 255.0) -> float:
    """Piella-Heijmans fusion quality Q (called "Qab/f" in the iVAN method description).

    ``Q = 1/|W| sum_w [lambda(w) Q0(A, F | w) + (1 - lambda(w)) Q0(B, F | w)]`` over all
    ``window x window`` windows ``w`` (stride 1, fully inside the image), with
    ``lambda(w) = s(A|w) / (s(A|w) + s(B|w))`` (0.5 if both are 0), ``s`` the local variance and
    ``Q0`` the universal image quality index (see :func:`_uiqi`). 1 when ``F = A = B``.

    Args:
        image_a: source A ``(M, N)``.
        image_b: source B ``(M, N)``.
        fused: fused image F ``(M, N)``, ``M, N >= window``.
        window: window side.
        scale: intensity multiplier (does not change the result).
    """
    a, b, f = _images(scale, image_a, image_b, fused)
    if min(a.shape) < window:
        raise ValueError(f"images must be at least {window}x{window}, got {a.shape}.")
    ma, va = _window_stats(a, window)
    mb, vb = _window_stats(b, window)
    mf, vf = _window_stats(f, window)
    q_af = _uiqi(ma, mf, va, vf, _window_cov(a, f, ma, mf, va, vf, window))
    q_bf = _uiqi(mb, mf, vb, vf, _window_cov(b, f, mb, mf, vb, vf, window))
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(va + vb > 0, va / (va + vb), 0.5)
    return float(np.mean(lam * q_af + (1.0 - lam) * q_bf))


def fusion_metrics(
    image_a: ArrayLike,
    image_b: ArrayLike,
    fused: ArrayLike,
    scale: float = 255.0,
    ag_variant: str = "standard",
    window: int = 8,
) -> dict[str, float]:
    """All fusion metrics of one 2D slice: keys ``ag``, ``sf``, ``en``, ``qmi``, ``qabf``, ``piella_q``."""
    return {
        "ag": average_gradient(fused, variant=ag_variant, scale=scale),
        "sf": spatial_frequency(fused, scale=scale),
        "en": entropy(fused, scale=scale),
        "qmi": qmi(image_a, image_b, fused, scale=scale),
        "qabf": qabf(image_a, image_b, fused, scale=scale),
        "piella_q": piella_q(image_a, image_b, fused, window=window, scale=scale),
    }
