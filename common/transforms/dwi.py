"""Rotation-invariant diffusion MRI features and paired low/high-resolution crops, as MONAI dict transforms.

Features (``noddi_sr`` spec §2.1, a project decision): per shell, a least-squares fit of the real, symmetric,
orthonormal spherical harmonics up to l = 2 to the b0-normalised signal E(g), then

- the spherical mean m_s = c₀₀ / √(4π) (the mean of E over the sphere), and
- the l = 2 power p_s = √(Σ_m c₂ₘ²) / √(4π).

A rotation R of the gradient table (or of the tissue) maps the l = 2 coefficients by an orthogonal 5×5 Wigner matrix,
so Σ_m c₂ₘ² — and therefore both features — do not depend on the table's orientation: a model fed with them does not
need the bvecs to be in any particular frame (FSL bvecs are in the voxel frame; a raw-volume input would depend on it).
Channels are [m_s for shells in ascending b] + [p_s likewise]: 2·n_shells channels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialCrop

from common.data.dwi import B0_THRESHOLD, GradientTableError, bin_shells, match_shells, normalise_b0, read_bvals_bvecs
from common.data.noddi_phantom import hr_affine

__all__ = [
    "real_sh_basis_l2",
    "shell_features",
    "brain_mask_from_s0",
    "DWIFeaturesd",
    "DWIBrainMaskd",
    "RandScaledPairCropd",
    "ScaledPairCenterCropd",
    "HRMapsd",
]

_C0 = 0.5 / np.sqrt(np.pi)
_C2 = 0.5 * np.sqrt(15.0 / np.pi)
_C20 = 0.25 * np.sqrt(5.0 / np.pi)
_C22 = 0.25 * np.sqrt(15.0 / np.pi)


def real_sh_basis_l2(bvecs: np.ndarray) -> np.ndarray:
    """Orthonormal real symmetric spherical harmonics for l = 0, 2 at unit vectors (N, 3) → (N, 6).

    Columns: Y₀₀, Y₂₋₂ ∝ xy, Y₂₋₁ ∝ yz, Y₂₀ ∝ 3z² − 1, Y₂₁ ∝ xz, Y₂₂ ∝ x² − y²; ∫ YᵢYⱼ dΩ = δᵢⱼ.
    """
    g = np.asarray(bvecs, dtype=np.float64)
    x, y, z = g[:, 0], g[:, 1], g[:, 2]
    return np.stack(
        [np.full_like(x, _C0), _C2 * x * y, _C2 * y * z, _C20 * (3 * z * z - 1), _C2 * x * z, _C22 * (x * x - y * y)], axis=1
    )


def shell_features(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    shells: Sequence[float] | None = None,
    shell_tolerance: float = 100.0,
    min_directions: int = 6,
    b0_threshold: float = B0_THRESHOLD,
    include_b0: bool = False,
    mask: np.ndarray | None = None,
    source: str = "the DWI series",
    shells_key: str | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Per-shell spherical mean and l = 2 power of a channel-first DWI series.

    Args:
        dwi: (N, X, Y, Z) signals.
        bvals: (N,) b-values in s/mm²; bvecs: (N, 3) unit vectors (zero for b0).
        shells: expected shell b-values (a missing one raises); None = every shell with ≥ ``min_directions``.
        include_b0: add S0 / P99.5(S0 in ``mask``) as the last channel.
        shells_key: the config key holding ``shells``, named by the error for a missing shell.

    Returns:
        features (C, X, Y, Z) float32 and the shell b-values used (ascending).
    """
    dwi = np.asarray(dwi, dtype=np.float32)
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if dwi.shape[0] != bvals.shape[0] or bvecs.shape != (bvals.shape[0], 3):
        raise GradientTableError(f"{source}: {dwi.shape[0]} volumes, {bvals.shape[0]} b-values and bvecs of shape {bvecs.shape}")
    e, s0 = normalise_b0(dwi, bvals, b0_threshold=b0_threshold, channel_axis=0)
    shell_of = bin_shells(bvals, tolerance=shell_tolerance, b0_threshold=b0_threshold)
    used = match_shells(shell_of, shells, tolerance=shell_tolerance, min_directions=min_directions, source=source, key=shells_key)
    spatial = dwi.shape[1:]
    means, powers = [], []
    for b in used:
        idx = np.flatnonzero(shell_of == b)
        basis = real_sh_basis_l2(bvecs[idx])
        pinv = np.linalg.pinv(basis)  # (6, n): least squares on the shell's directions
        coef = pinv @ e[idx].reshape(idx.size, -1).astype(np.float64)
        means.append(coef[0] / np.sqrt(4 * np.pi))
        powers.append(np.sqrt(np.sum(coef[1:] ** 2, axis=0)) / np.sqrt(4 * np.pi))
    feats = [m.reshape(spatial) for m in means] + [p.reshape(spatial) for p in powers]
    if include_b0:
        sel = s0[mask > 0] if mask is not None else s0[s0 > 0]
        ref = float(np.percentile(sel, 99.5)) if sel.size else 1.0
        feats.append(s0 / max(ref, 1e-6))
    return np.stack(feats).astype(np.float32), used


class DWIFeaturesd(MapTransform):
    """Replace a channel-first DWI series by its rotation-invariant per-shell features (see module docstring).

    The gradient table comes from ``bval_key``/``bvec_key``: file paths (read and checked against the number of
    volumes, :func:`common.data.dwi.read_bvals_bvecs`) or arrays. The output keeps the input's metadata (affine).

    Args:
        keys: DWI keys (N, X, Y, Z).
        bval_key, bvec_key: keys of the gradient files or arrays.
        shells: the shells the model was trained with (configs record them); a missing shell raises, extra shells are
            ignored with a warning. None uses every shell with ≥ ``min_directions`` volumes.
        shell_tolerance: b-values closer than this belong to one shell, and match an expected shell within it.
        include_b0: append the normalised S0 channel (uses ``mask_key`` when given).
        shells_key: the config key that holds ``shells`` (named by the error for a missing shell).
    """

    def __init__(
        self,
        keys: KeysCollection,
        bval_key: str = "bval",
        bvec_key: str = "bvec",
        shells: Sequence[float] | None = None,
        shell_tolerance: float = 100.0,
        min_directions: int = 6,
        b0_threshold: float = B0_THRESHOLD,
        include_b0: bool = False,
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
        shells_key: str | None = "shells",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.bval_key, self.bvec_key = bval_key, bvec_key
        self.shells_key = shells_key
        self.shells = None if shells is None else [float(s) for s in shells]
        self.shell_tolerance = float(shell_tolerance)
        self.min_directions = int(min_directions)
        self.b0_threshold = float(b0_threshold)
        self.include_b0 = include_b0
        self.mask_key = mask_key
        self._warned: set[str] = set()

    def _table(self, d: Mapping, n: int) -> tuple[np.ndarray, np.ndarray, str]:
        bval, bvec = d[self.bval_key], d[self.bvec_key]
        if isinstance(bval, (str, bytes)) or hasattr(bval, "__fspath__"):
            table = read_bvals_bvecs(bval, bvec, n_volumes=n, b0_threshold=self.b0_threshold)
            return table.bvals, table.bvecs, f"'{bval}'"
        bvals = np.asarray(bval.cpu() if torch.is_tensor(bval) else bval, dtype=np.float64).reshape(-1)
        bvecs = np.asarray(bvec.cpu() if torch.is_tensor(bvec) else bvec, dtype=np.float64)
        if bvecs.shape == (3, bvals.shape[0]) and bvals.shape[0] != 3:
            bvecs = bvecs.T
        if bvals.shape[0] != n:
            raise GradientTableError(f"the DWI series has {n} volumes but {bvals.shape[0]} b-values were given")
        return bvals, bvecs, "the DWI series"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
            bvals, bvecs, source = self._table(d, arr.shape[0])
            mask = None
            if self.mask_key is not None and self.mask_key in d:
                m = d[self.mask_key]
                mask = np.asarray(m.cpu() if torch.is_tensor(m) else m)[0]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                feats, _ = shell_features(
                    arr,
                    bvals,
                    bvecs,
                    shells=self.shells,
                    shell_tolerance=self.shell_tolerance,
                    min_directions=self.min_directions,
                    b0_threshold=self.b0_threshold,
                    include_b0=self.include_b0,
                    mask=mask,
                    source=source,
                    shells_key=self.shells_key,
                )
            for w in caught:  # the same acquisition gives the same warning for every case: say it once
                msg = str(w.message)
                what = msg.split(": ", 1)[-1]  # without the file name
                if what not in self._warned:
                    self._warned.add(what)
                    warnings.warn(msg, w.category, stacklevel=2)
            out = torch.as_tensor(feats)
            d[key] = MetaTensor(out, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out
        return d


def _scaled_pair(lr_keys, hr_keys, lr_roi_size, scale):
    """Key lists, LR roi (a 3-tuple, or None) and integer scale of the scaled-pair crops."""
    lr = [lr_keys] if isinstance(lr_keys, str) else list(lr_keys)
    hr = [hr_keys] if isinstance(hr_keys, str) else list(hr_keys)
    if lr_roi_size is None:
        roi = None
    else:
        roi = (int(lr_roi_size),) * 3 if isinstance(lr_roi_size, int) else tuple(int(v) for v in lr_roi_size)
    return lr, hr, roi, int(scale)


class RandScaledPairCropd(Randomizable, MapTransform):
    """Random crop of a low-resolution patch and the matching high-resolution patch (HR = ``scale`` × LR grid).

    The LR patch starts at voxel p, the HR patch at ``scale``·p with ``scale`` × the size, so both cover the same
    field of view when the HR grid splits each LR voxel into scale³ voxels (noddi_sr spec §1). Locations whose
    ``fg_key`` (HR) patch holds less than ``min_fg_fraction`` foreground are redrawn (up to ``max_tries``; the best
    draw is kept), so training sees brain, not background.
    """

    def __init__(
        self,
        lr_keys: KeysCollection,
        hr_keys: KeysCollection,
        lr_roi_size: Sequence[int] | int,
        scale: int = 2,
        fg_key: str | None = None,
        min_fg_fraction: float = 0.1,
        max_tries: int = 20,
        allow_missing_keys: bool = False,
    ) -> None:
        self.lr_keys, self.hr_keys, self.lr_roi, self.scale = _scaled_pair(lr_keys, hr_keys, lr_roi_size, scale)
        super().__init__(self.lr_keys + self.hr_keys, allow_missing_keys)
        self.fg_key, self.min_fg_fraction, self.max_tries = fg_key, float(min_fg_fraction), int(max_tries)
        self._start: tuple[int, ...] = (0, 0, 0)

    def randomize(self, lr_shape: Sequence[int], fg: torch.Tensor | None = None) -> None:
        best, best_frac = None, -1.0
        for _ in range(max(self.max_tries, 1)):
            start = tuple(int(self.R.randint(0, max(s - r, 0) + 1)) for s, r in zip(lr_shape, self.lr_roi))
            if fg is None:
                best = start
                break
            sl = tuple(slice(p * self.scale, (p + r) * self.scale) for p, r in zip(start, self.lr_roi))
            frac = float((fg[(slice(None),) + sl] > 0).float().mean())
            if frac > best_frac:
                best, best_frac = start, frac
            if frac >= self.min_fg_fraction:
                break
        self._start = best

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lr_shape = d[self.lr_keys[0]].shape[1:]
        if any(s < r for s, r in zip(lr_shape, self.lr_roi)):
            raise ValueError(f"low-resolution image of shape {tuple(lr_shape)} is smaller than the patch {self.lr_roi}")
        fg = d.get(self.fg_key) if self.fg_key else None
        self.randomize(lr_shape, torch.as_tensor(fg) if fg is not None else None)
        for key in self.key_iterator(d):
            s = 1 if key in self.lr_keys else self.scale
            start = [p * s for p in self._start]
            end = [(p + r) * s for p, r in zip(self._start, self.lr_roi)]
            d[key] = SpatialCrop(roi_start=start, roi_end=end)(d[key])
        return d


class ScaledPairCenterCropd(MapTransform):
    """Centred crop of a low-resolution image and the matching high-resolution images (HR = ``scale`` × LR grid).

    The LR crop keeps ``lr_roi_size`` voxels around the centre (start ⌊(size − roi)/2⌋; an axis no larger than the
    roi, or a roi of None / ≤ 0, is kept whole); HR keys are cropped at ``scale`` × that start with ``scale`` × the size,
    so LR and HR still cover the same field of view and the MetaTensor affines stay consistent. Used to bound the
    cost of validation by sampling (``val_roi`` of ``train_diffusion.json``: fewer sliding windows per volume).
    """

    def __init__(
        self,
        lr_keys: KeysCollection,
        hr_keys: KeysCollection,
        lr_roi_size: Sequence[int] | int | None,
        scale: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        self.lr_keys, self.hr_keys, self.lr_roi, self.scale = _scaled_pair(lr_keys, hr_keys, lr_roi_size, scale)
        super().__init__(self.lr_keys + self.hr_keys, allow_missing_keys)

    def window(self, lr_shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """(start, end) of the LR crop for an LR image of spatial shape ``lr_shape``."""
        if self.lr_roi is None:
            return [0] * len(lr_shape), [int(s) for s in lr_shape]
        start, end = [], []
        for s, r in zip(lr_shape, self.lr_roi):
            size = int(s) if r <= 0 or r >= s else int(r)
            p = (int(s) - size) // 2
            start.append(p)
            end.append(p + size)
        return start, end

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start, end = self.window(d[self.lr_keys[0]].shape[1:])
        for key in self.key_iterator(d):
            s = 1 if key in self.lr_keys else self.scale
            d[key] = SpatialCrop(roi_start=[p * s for p in start], roi_end=[e * s for e in end])(d[key])
        return d


def brain_mask_from_s0(s0: np.ndarray, background_ratio: float = 0.3) -> np.ndarray:
    """Brain mask of a DWI series: S0 above its Otsu threshold, largest connected component, holes filled.

    A field of view cropped to the brain has no background, and Otsu would then split tissue from CSF: when the mean S0
    below the threshold exceeds ``background_ratio`` × the mean above it (true background is at the noise floor, a few
    per cent of tissue S0), every voxel with S0 > 0 is kept (a project decision).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    s0 = np.asarray(s0, dtype=np.float64)
    if not np.any(s0 > 0) or np.ptp(s0) == 0:
        return s0 > 0
    thr = threshold_otsu(s0)
    fg = s0 > thr
    if s0[~fg].mean() > background_ratio * s0[fg].mean():
        return s0 > 0
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, labels, range(1, n + 1))
        fg = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(fg)


class DWIBrainMaskd(MapTransform):
    """Create ``mask_key`` (1, X, Y, Z) from the mean b0 of a channel-first DWI series when it is not given.

    A mask already present (loaded from the datalist's optional ``mask``) is binarised and kept. Otherwise
    :func:`brain_mask_from_s0` (S0 above its Otsu threshold, largest connected component; noddi_sr spec §4 step 1).
    Run it before the features replace the DWI volumes.
    """

    def __init__(
        self, keys: KeysCollection, bval_key: str = "bval", bvec_key: str = "bvec", mask_key: str = "mask", b0_threshold: float = B0_THRESHOLD
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.bval_key, self.bvec_key, self.mask_key, self.b0_threshold = bval_key, bvec_key, mask_key, float(b0_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        img = d[key]
        existing = d.get(self.mask_key)
        if existing is not None and not isinstance(existing, (str, bytes)):
            m = torch.as_tensor(existing) > 0
            out = m.to(torch.uint8).reshape(1, *img.shape[1:])
        else:
            bval = d[self.bval_key]
            bvals = read_bvals_bvecs(bval, d[self.bvec_key], n_volumes=img.shape[0]).bvals if isinstance(bval, str) else np.asarray(bval).reshape(-1)
            arr = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
            _, s0 = normalise_b0(arr, bvals, b0_threshold=self.b0_threshold, channel_axis=0)
            out = torch.as_tensor(brain_mask_from_s0(s0)[None].astype(np.uint8))
        d[self.mask_key] = MetaTensor(out, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out
        return d


class HRMapsd(MapTransform):
    """Put predicted HR maps on the HR grid: affine from the LR image's, values clipped, zero outside the mask.

    The affine is A_hr = A_lr · diag(1/s, 1/s, 1/s, 1) with translation A_lr · [−(s−1)/(2s), …, 1]ᵀ (noddi_sr spec §1:
    each LR voxel splits into s³ HR voxels, the field of view is unchanged). The mask (LR, ``mask_key``) is upsampled
    by nearest-neighbour repetition; ``hr_mask_key`` (already on the HR grid) takes precedence when present.

    Args:
        keys: predicted maps (C, sX, sY, sZ).
        ref_key: the LR image whose affine defines the grid.
        scale: HR/LR ratio.
        clip: value range of the maps.
        case_key: when the data holds this key (the datalist's ``id``), outputs are named after it
            (``<id>_<postfix>.nii.gz``); otherwise after the input file.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        mask_key: str | None = "mask",
        hr_mask_key: str | None = None,
        scale: int = 2,
        clip: tuple[float, float] = (0.0, 1.0),
        case_key: str | None = "id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mask_key, self.hr_mask_key, self.case_key = ref_key, mask_key, hr_mask_key, case_key
        self.scale, self.clip = int(scale), clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        a_lr = np.asarray(ref.affine.cpu() if isinstance(ref, MetaTensor) else np.eye(4), dtype=np.float64)
        a_hr = torch.as_tensor(hr_affine(a_lr, self.scale), dtype=torch.float64)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).float()
            expect = tuple(s * self.scale for s in ref.shape[1:])
            if tuple(pred.shape[1:]) != expect:
                raise ValueError(f"'{key}' has spatial shape {tuple(pred.shape[1:])}, expected {expect} ({self.scale}× the LR grid)")
            pred = pred.clamp(*self.clip)
            mask = None
            if self.hr_mask_key and self.hr_mask_key in d:
                mask = torch.as_tensor(d[self.hr_mask_key])[:1] > 0
            elif self.mask_key and self.mask_key in d:
                m = torch.as_tensor(d[self.mask_key])[:1] > 0
                for axis in (1, 2, 3):
                    m = m.repeat_interleave(self.scale, dim=axis)
                mask = m
            if mask is not None:
                pred = pred * mask.to(pred.device, pred.dtype)
            meta = dict(ref.meta) if isinstance(ref, MetaTensor) else {}
            meta["affine"] = a_hr
            meta["original_affine"] = a_hr
            meta["spatial_shape"] = np.asarray(expect)
            if self.case_key and isinstance(d.get(self.case_key), str):
                # a datalist loader may have joined an id that names a folder to its base directory
                meta["filename_or_obj"] = f"{os.path.basename(d[self.case_key].rstrip('/'))}.nii.gz"
            d[key] = MetaTensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred, meta=meta)
        return d
