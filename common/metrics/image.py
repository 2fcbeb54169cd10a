"""Image-similarity metrics for synthesis and translation bundles (PSNR, SSIM, NMSE, MAE, Pearson r).

Every function accepts NumPy arrays or PyTorch tensors (any device; tensors are detached and moved
to the CPU) and computes in float64. ``pred`` and ``target`` must have the same shape; an optional
``mask`` must be broadcastable to that shape and is interpreted as boolean (non-zero = evaluated).
Scalar results are returned as Python ``float``.

Conventions (see the evaluation sections of the method specs of ``aldm_translation``, ``noddi_sr``
and ``ivan_fusion``):

* Volumes are expected on a fixed intensity scale, normally ``[0, 1]`` (prediction clipped by the
  caller); ``data_range`` is the width of that scale (1 for ``[0, 1]``, 255 for 8-bit images).
* 3D metrics (:func:`psnr`, :func:`ssim3d`, :func:`nmse`, :func:`mae`) treat the whole array, or
  the voxels of ``mask``, as one sample.
* 2D per-slice metrics (:func:`psnr_per_slice`, :func:`ssim_per_slice`) reproduce the scikit-image
  evaluation of the iVAN code: one value per 2D slice, slices whose target is all zero are skipped
  and the number of evaluated slices is reported.
* :func:`flat_ssim` is the compatibility SSIM of the CLDM (NODDI super-resolution) code: a 1D SSIM
  along the flattened voxel order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.ndimage import correlate1d, uniform_filter

__all__ = [
    "PerSliceResult",
    "psnr",
    "ssim3d",
    "ssim_per_slice",
    "psnr_per_slice",
    "nmse",
    "mae",
    "pearson_r",
    "flat_ssim",
]

ArrayLike = np.ndarray | torch.Tensor


class PerSliceResult(NamedTuple):
    """Result of a per-slice metric.

    Attributes:
        values: metric of each evaluated slice, shape ``(count,)``.
        indices: index (along the slicing axis) of each evaluated slice, shape ``(count,)``.
        mean: mean of ``values`` (NaN when no slice was evaluated).
        count: number of evaluated slices (slices with an all-zero target are skipped by default).
    """

    values: np.ndarray
    indices: np.ndarray
    mean: float
    count: int


def _to_numpy(x: ArrayLike | float, dtype: type = np.float64) -> np.ndarray:
    """Convert a tensor or array to a NumPy array of ``dtype`` (float64 by default)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, t = _to_numpy(pred), _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}.")
    return p, t


def _mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = _to_numpy(mask, dtype=bool)
    try:
        return np.broadcast_to(m, shape)
    except ValueError as e:
        raise ValueError(f"mask of shape {m.shape} cannot be broadcast to the image shape {shape}.") from e


def _select(p: np.ndarray, t: np.ndarray, mask: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of ``p`` and ``t`` that are evaluated (all, or those of ``mask``), flattened."""
    m = _mask(mask, p.shape)
    if m is None:
        return p.ravel(), t.ravel()
    return p[m], t[m]


def _psnr_from_mse(mse: float | np.ndarray, data_range: float) -> float | np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(np.float64(data_range) ** 2 / np.asarray(mse, dtype=np.float64))


def psnr(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0, mask: ArrayLike | None = None) -> float:
    """Peak signal-to-noise ratio over a whole volume or over the voxels of a mask.

    ``PSNR = 10 log10(data_range^2 / MSE)`` with ``MSE`` the mean squared error over all voxels of
    the array (any shape, e.g. ``(H, W, D)``) or over the voxels where ``mask`` is non-zero. With
    ``data_range=1`` on ``[0, 1]`` data this is the ``10 log10(1 / MSE)`` of the ``aldm_translation``
    and ``noddi_sr`` specs and equals scikit-image ``peak_signal_noise_ratio(target, pred,
    data_range=1)``; images on ``[0, 255]`` use ``data_range=255``.

    Args:
        pred: predicted image, any shape.
        target: reference image, same shape as ``pred``.
        data_range: width of the intensity scale (maximum possible value minus minimum).
        mask: optional evaluation mask broadcastable to ``pred.shape``.

    Returns:
        PSNR in dB; ``inf`` if the evaluated voxels are identical, NaN if the mask is empty.
    """
    p, t = _select(*_pair(pred, target), mask)
    if p.size == 0:
        return float("nan")
    mse = float(np.mean((p - t) ** 2))
    return float(_psnr_from_mse(mse, float(data_range)))


def nmse(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Normalised mean squared error ``sum (pred - target)^2 / sum target^2``.

    Sums run over all voxels or over the voxels of ``mask`` (``aldm_translation`` spec §6, iVAN
    spec §6). A prediction of zeros gives 1.

    Args:
        pred: predicted image, any shape.
        target: reference image, same shape as ``pred``.
        mask: optional evaluation mask broadcastable to ``pred.shape``.

    Returns:
        NMSE (dimensionless). ``inf`` if the target is zero on the evaluated voxels and the
        prediction is not, NaN if both are zero there or the mask is empty.
    """
    p, t = _select(*_pair(pred, target), mask)
    if p.size == 0:
        return float("nan")
    num = float(np.sum((p - t) ** 2))
    den = float(np.sum(t**2))
    if den == 0.0:
        return float("nan") if num == 0.0 else float("inf")
    return num / den


def mae(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean absolute error over all voxels or over the voxels of ``mask`` (NaN for an empty mask).

    Args:
        pred: predicted image, any shape.
        target: reference image, same shape as ``pred``.
        mask: optional evaluation mask broadcastable to ``pred.shape``.
    """
    p, t = _select(*_pair(pred, target), mask)
    if p.size == 0:
        return float("nan")
    return float(np.mean(np.abs(p - t)))


def pearson_r(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Pearson correlation of ``pred`` and ``target`` over all voxels or the voxels of ``mask``.

    A contrast check beside PSNR/SSIM: a synthesis that outputs the mean intensity inside the brain can beat
    a model with the right contrast in PSNR, but its correlation with the target there is about 0.
    NaN for fewer than two voxels or a constant image.
    """
    p, t = _select(*_pair(pred, target), mask)
    if p.size < 2 or np.ptp(p) == 0.0 or np.ptp(t) == 0.0:
        return float("nan")
    p, t = p - p.mean(), t - t.mean()
    den = float(np.sqrt(np.sum(p**2) * np.sum(t**2)))
    return float(np.sum(p * t) / den) if den > 0.0 else float("nan")


def _kernel_1d(kernel: str, kernel_size: int, sigma: float) -> np.ndarray:
    """Normalised 1D window; its outer products are MONAI's ``_gaussian_kernel`` / uniform kernel."""
    if kernel == "gaussian":
        dist = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
        g = np.exp(-((dist / sigma) ** 2) / 2)
        return g / g.sum()
    if kernel == "uniform":
        return np.full(kernel_size, 1.0 / kernel_size)
    raise ValueError(f"kernel must be 'gaussian' or 'uniform', got {kernel!r}.")


def _valid_filter(x: np.ndarray, k1d: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of ``x`` with ``k1d`` along every axis (size shrinks by ``k - 1``)."""
    r = k1d.size // 2
    for axis in range(x.ndim):
        x = correlate1d(x, k1d, axis=axis, mode="constant")
        x = x[(slice(None),) * axis + (slice(r, x.shape[axis] - r),)]
    return x


def _ssim_map(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float,
    kernel: str,
    kernel_size: int,
    sigma: float,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Valid-convolution SSIM map of MONAI ``compute_ssim_and_cs`` (float64, separable window).

    The map has shape ``spatial - kernel_size + 1`` per axis; map voxel ``i`` is centred on input
    voxel ``i + kernel_size // 2``.
    """
    if pred.ndim not in (2, 3):
        raise ValueError(f"SSIM expects a 2D (H, W) or 3D (H, W, D) image, got shape {pred.shape}.")
    if min(pred.shape) < kernel_size:
        raise ValueError(f"every spatial size must be >= kernel_size={kernel_size}, got {pred.shape}.")
    x, y = pred, target
    k1d = _kernel_1d(kernel, kernel_size, sigma)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = (_valid_filter(v, k1d) for v in (x, y, x * x, y * y, x * y))
    sigma_x = mu_xx - mu_x * mu_x
    sigma_y = mu_yy - mu_y * mu_y
    sigma_xy = mu_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * ((2 * sigma_xy + c2) / (sigma_x + sigma_y + c2))
    return ssim


def ssim3d(
    pred: ArrayLike,
    target: ArrayLike,
    data_range: float = 1.0,
    mask: ArrayLike | None = None,
    kernel: str = "gaussian",
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity of two volumes with MONAI ``SSIMMetric`` defaults.

    Follows MONAI ``compute_ssim_and_cs`` (Wang et al., "Image quality assessment: from error
    visibility to structural similarity", IEEE TIP 2004): Gaussian window ``kernel_size^3``
    (normalised, sigma 1.5), population (co)variances, ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``, and a
    *valid* convolution, so the SSIM map is smaller than the image by ``kernel_size - 1`` per axis.

    * Without a mask the result is the mean of the SSIM map (equals
      ``monai.metrics.SSIMMetric(spatial_dims=3, data_range=R)``).
    * With a mask the result is the mean of the map over the mask voxels at which a full window
      fits, i.e. the mask cropped by the kernel radius (``kernel_size // 2``, 5 voxels) on each side
      (``aldm_translation`` spec §6, ``noddi_sr`` spec §6).

    The window is applied as three 1D passes (the Gaussian kernel of MONAI is the outer product of
    1D Gaussians), in float64. MONAI casts to float32, whose ``E[x^2] - E[x]^2`` cancellation
    changes single map voxels of flat regions by up to about 1e-3 (means by about 1e-4).

    Args:
        pred: predicted volume ``(H, W, D)`` (a 2D ``(H, W)`` image also works).
        target: reference volume, same shape as ``pred``.
        data_range: width of the intensity scale (1 for ``[0, 1]``).
        mask: optional evaluation mask broadcastable to ``pred.shape``.
        kernel: ``"gaussian"`` or ``"uniform"`` (MONAI ``KernelType``).
        kernel_size: odd window size per axis.
        sigma: standard deviation of the Gaussian window (voxels).
        k1: luminance stability constant.
        k2: contrast stability constant.

    Returns:
        mean SSIM; NaN if the cropped mask is empty.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
    p, t = _pair(pred, target)
    smap = _ssim_map(p, t, float(data_range), kernel, kernel_size, sigma, k1, k2)
    m = _mask(mask, p.shape)
    if m is None:
        return float(smap.mean())
    r = kernel_size // 2
    m_valid = m[tuple(slice(r, s - r) for s in m.shape)]
    if not m_valid.any():
        return float("nan")
    return float(smap[m_valid].mean())


def _skimage_ssim(
    x: np.ndarray, y: np.ndarray, data_range: float, win_size: int, axes: Sequence[int], k1: float, k2: float
) -> np.ndarray:
    """scikit-image ``structural_similarity`` (default settings) evaluated along ``axes`` only.

    Uniform ``win_size`` window (``scipy.ndimage.uniform_filter``, reflect boundary), sample
    covariance (``NP / (NP - 1)`` with ``NP = win_size ** len(axes)``). Returns the mean SSIM over
    the map cropped by ``(win_size - 1) // 2`` along ``axes``, for every index of the other axes.
    """
    size = [1] * x.ndim
    for a in axes:
        if x.shape[a] < win_size:
            raise ValueError(f"image extent {x.shape[a]} along axis {a} is smaller than win_size={win_size}.")
        size[a] = win_size
    ux = uniform_filter(x, size=size)
    uy = uniform_filter(y, size=size)
    uxx = uniform_filter(x * x, size=size)
    uyy = uniform_filter(y * y, size=size)
    uxy = uniform_filter(x * y, size=size)
    npix = win_size ** len(axes)
    cov_norm = npix / (npix - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    crop = tuple(slice(pad, x.shape[a] - pad) if a in axes else slice(None) for a in range(x.ndim))
    return s[crop].mean(axis=tuple(axes))


def _slices(pred: ArrayLike, target: ArrayLike, axis: int, skip_empty: bool):
    p, t = _pair(pred, target)
    if p.ndim != 3:
        raise ValueError(f"per-slice metrics expect a 3D volume, got shape {p.shape}.")
    p, t = np.moveaxis(p, axis, 0), np.moveaxis(t, axis, 0)  # (S, H, W)
    keep = np.any(t != 0, axis=(1, 2)) if skip_empty else np.ones(t.shape[0], dtype=bool)
    idx = np.flatnonzero(keep)
    return p[idx], t[idx], idx


def _result(values: np.ndarray, idx: np.ndarray) -> PerSliceResult:
    mean = float(np.mean(values)) if values.size else float("nan")
    return PerSliceResult(values=values, indices=idx, mean=mean, count=int(idx.size))


def ssim_per_slice(
    pred: ArrayLike,
    target: ArrayLike,
    axis: int = -1,
    data_range: float = 1.0,
    skip_empty: bool = True,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> PerSliceResult:
    """2D SSIM of every slice of a volume, as scikit-image ``structural_similarity`` with defaults.

    Each 2D slice (taken along ``axis``) gets ``structural_similarity(target_slice, pred_slice,
    data_range=data_range)``: 7x7 uniform window, reflect boundary, sample covariance, K1 0.01,
    K2 0.03, mean over the map cropped by 3 pixels (iVAN spec §6, the code's per-slice SSIM). All
    slices are computed at once in float64.

    Args:
        pred: predicted volume, 3D, e.g. ``(H, W, S)`` with ``axis=-1``.
        target: reference volume, same shape.
        axis: axis that indexes the slices.
        data_range: width of the intensity scale (1 for ``[0, 1]``).
        skip_empty: skip slices whose target is all zero (the count is reported).
        win_size: odd side of the uniform window.
        k1: luminance stability constant.
        k2: contrast stability constant.

    Returns:
        :class:`PerSliceResult` with the per-slice SSIM, slice indices, mean and count.
    """
    p, t, idx = _slices(pred, target, axis, skip_empty)
    if idx.size == 0:
        return _result(np.zeros(0), idx)
    values = _skimage_ssim(p, t, float(data_range), win_size, axes=(1, 2), k1=k1, k2=k2)
    return _result(values, idx)


def psnr_per_slice(
    pred: ArrayLike, target: ArrayLike, axis: int = -1, data_range: float = 1.0, skip_empty: bool = True
) -> PerSliceResult:
    """PSNR of every 2D slice of a volume (paper/code style of iVAN).

    Per slice ``10 log10(data_range^2 / MSE_slice)``. On ``[0, 1]`` data with ``data_range=1`` this
    equals the code's ``peak_signal_noise_ratio(255 y, 255 y_hat, data_range=255)``, because scaling
    both images and the range by 255 leaves the ratio unchanged (iVAN spec §6 and §9).

    Args:
        pred: predicted volume, 3D.
        target: reference volume, same shape.
        axis: axis that indexes the slices.
        data_range: width of the intensity scale.
        skip_empty: skip slices whose target is all zero (the count is reported).

    Returns:
        :class:`PerSliceResult`; a slice reproduced exactly has PSNR ``inf``.
    """
    p, t, idx = _slices(pred, target, axis, skip_empty)
    mse = np.mean((p - t) ** 2, axis=(1, 2)) if idx.size else np.zeros(0)
    return _result(np.asarray(_psnr_from_mse(mse, float(data_range)), dtype=np.float64), idx)


def flat_ssim(
    pred: ArrayLike,
    target: ArrayLike,
    data_range: float | None = None,
    channel_axis: int | None = None,
    win_size: int | None = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """SSIM of flattened maps, the compatibility metric of the CLDM NODDI code (``noddi_sr`` spec §6).

    Each map (the whole array, or each index of ``channel_axis``) is flattened in C order to a 1D
    vector ``x`` (prediction) and ``y`` (target) of ``N`` voxels; the results of the maps are
    averaged. With ``R = data_range``, ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``:

    * ``win_size=7`` (default, what CLDM's ``structural_similarity(gt, pred, channel_axis=1,
      data_range=r)`` on the ``(N_vox, n_maps)`` matrix computes): local statistics in 7-sample
      uniform windows along the vector (reflect boundary, sample covariance ``7/6``),
      ``s_i = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
      averaged over ``i = 3 .. N - 4``;
    * ``win_size=None``: one window over the whole vector (global means, variances and
      covariance with ``1 / (N - 1)``), giving a single ``s`` per map.

    Args:
        pred: predicted map(s), any shape.
        target: reference map(s), same shape.
        data_range: ``R``; ``None`` uses ``target.max() - target.min()`` over the whole array, as
            CLDM does.
        channel_axis: axis that indexes separate maps (e.g. 0 for a ``(3, D, H, W)`` NODDI stack);
            ``None`` treats the whole array as one map.
        win_size: odd 1D window length, or ``None`` for global statistics.
        k1: luminance stability constant.
        k2: contrast stability constant.

    Returns:
        mean flattened SSIM over maps.
    """
    p, t = _pair(pred, target)
    r = float(t.max() - t.min()) if data_range is None else float(data_range)
    if channel_axis is None:
        p2, t2 = p.reshape(1, -1), t.reshape(1, -1)
    else:
        n = p.shape[channel_axis]
        p2 = np.moveaxis(p, channel_axis, 0).reshape(n, -1)
        t2 = np.moveaxis(t, channel_axis, 0).reshape(n, -1)
    c1 = (k1 * r) ** 2
    c2 = (k2 * r) ** 2
    if win_size is None:
        n_vox = p2.shape[1]
        mx, my = p2.mean(axis=1), t2.mean(axis=1)
        vx = p2.var(axis=1, ddof=1)
        vy = t2.var(axis=1, ddof=1)
        vxy = np.sum((p2 - mx[:, None]) * (t2 - my[:, None]), axis=1) / (n_vox - 1)
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        return float(np.mean(s))
    if win_size % 2 != 1:
        raise ValueError(f"win_size must be odd, got {win_size}.")
    return float(np.mean(_skimage_ssim(p2, t2, r, win_size, axes=(1,), k1=k1, k2=k2)))
