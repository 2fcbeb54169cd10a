"""Diffusion MRI gradient tables: FSL ``bval``/``bvec`` reading with checks, shell binning and b0 normalisation.

FSL conventions (FSL FDT documentation): ``bvals`` is one row of N b-values in s/mm²; ``bvecs`` is 3 rows of N unit
vectors (a N×3 layout is accepted and transposed) expressed in the **image (voxel) frame**, so a reorientation of
the image must rotate the bvecs consistently. b0 volumes may carry a zero or NaN vector (dipy's ``small_64D`` has a
NaN vector for its b0): vectors of b0 volumes are set to zero, every other vector must be finite and is normalised.

Every error names the offending file, so a wrong pairing of DWI and gradient files is found at load time instead of
as a silently wrong feature map.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.utils.errors import InvalidInputError

__all__ = [
    "GradientTable",
    "GradientTableError",
    "read_bvals_bvecs",
    "write_bvals_bvecs",
    "bin_shells",
    "match_shells",
    "normalise_b0",
]

B0_THRESHOLD = 50.0  # s/mm²: volumes at or below are b0 (spec §2.1, AMICO ``b0_thr=50``)


class GradientTableError(InvalidInputError):
    """A ``bval``/``bvec`` pair is malformed or does not match its DWI series."""


@dataclass(frozen=True)
class GradientTable:
    """b-values (N,) in s/mm² and unit gradient directions (N, 3) in the image frame (zero for b0 volumes)."""

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = B0_THRESHOLD

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= self.b0_threshold

    def __len__(self) -> int:
        return int(self.bvals.shape[0])


def _load_rows(path: str | os.PathLike, what: str) -> np.ndarray:
    try:
        arr = np.loadtxt(os.fspath(path), dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise GradientTableError(f"cannot read {what} file '{path}': {e}") from e
    return arr


def read_bvals_bvecs(
    bval_path: str | os.PathLike,
    bvec_path: str | os.PathLike,
    n_volumes: int | None = None,
    b0_threshold: float = B0_THRESHOLD,
    norm_tolerance: float = 0.1,
) -> GradientTable:
    """Read an FSL ``bval``/``bvec`` pair and check it.

    Args:
        bval_path: text file with N b-values (one row, or one column).
        bvec_path: text file with 3 rows of N components (or N rows of 3).
        n_volumes: length of the DWI series' 4th dimension; a different count raises.
        b0_threshold: b-values ≤ this are b0 volumes (their vectors are set to zero).
        norm_tolerance: a non-b0 vector whose norm differs from 1 by more than this raises (it is almost certainly
            not a direction, e.g. a b-value-scaled vector); smaller deviations are renormalised.

    Raises:
        GradientTableError: unreadable files, counts that disagree (with each other or with ``n_volumes``),
            negative or non-finite b-values, non-finite or zero vectors for non-b0 volumes.
    """
    bvals = _load_rows(bval_path, "bval")
    if 1 not in bvals.shape:
        raise GradientTableError(f"bval file '{bval_path}' must hold one row (or column) of b-values, got shape {bvals.shape}")
    bvals = bvals.reshape(-1)
    bvecs = _load_rows(bvec_path, "bvec")
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape[0] != 3:
        raise GradientTableError(f"bvec file '{bvec_path}' must hold 3 rows (x, y, z) of N components, got shape {bvecs.shape}")
    bvecs = bvecs.T.copy()
    if bvecs.shape[0] != bvals.shape[0]:
        raise GradientTableError(
            f"bval file '{bval_path}' lists {bvals.shape[0]} b-values but bvec file '{bvec_path}' lists {bvecs.shape[0]} vectors"
        )
    if n_volumes is not None and bvals.shape[0] != int(n_volumes):
        raise GradientTableError(
            f"the DWI series has {int(n_volumes)} volumes but bval file '{bval_path}' lists {bvals.shape[0]} b-values"
        )
    if not np.all(np.isfinite(bvals)):
        raise GradientTableError(f"bval file '{bval_path}' contains non-finite values")
    if np.any(bvals < 0):
        raise GradientTableError(f"bval file '{bval_path}' contains negative b-values")
    b0 = bvals <= b0_threshold
    bvecs[b0] = 0.0
    dw = ~b0
    if not np.all(np.isfinite(bvecs[dw])):
        bad = np.flatnonzero(dw & ~np.all(np.isfinite(bvecs), axis=1))
        raise GradientTableError(f"bvec file '{bvec_path}' has non-finite vectors for diffusion-weighted volumes {bad.tolist()}")
    norms = np.linalg.norm(bvecs[dw], axis=1)
    off = np.abs(norms - 1.0) > norm_tolerance
    if np.any(off):
        bad = np.flatnonzero(dw)[off]
        raise GradientTableError(
            f"bvec file '{bvec_path}' has vectors that are not unit length for volumes {bad.tolist()} "
            f"(norms {np.round(norms[off], 4).tolist()}); FSL bvecs must be unit directions"
        )
    bvecs[dw] /= norms[:, None]
    return GradientTable(bvals=bvals, bvecs=bvecs, b0_threshold=float(b0_threshold))


def write_bvals_bvecs(bval_path: str | os.PathLike, bvec_path: str | os.PathLike, bvals: np.ndarray, bvecs: np.ndarray) -> None:
    """Write an FSL pair: one row of b-values (integers when they are), three rows of vector components."""
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.shape != (bvals.shape[0], 3):
        raise GradientTableError(f"bvecs must have shape (N, 3) = ({bvals.shape[0]}, 3), got {bvecs.shape}")
    fmt = "%d" if np.allclose(bvals, np.round(bvals)) else "%.6f"
    np.savetxt(os.fspath(bval_path), bvals[None], fmt=fmt)
    np.savetxt(os.fspath(bvec_path), bvecs.T, fmt="%.8f")


def bin_shells(bvals: np.ndarray, tolerance: float = 100.0, round_to: float = 100.0, b0_threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Shell b-value of every volume (0 for b0 volumes).

    Non-b0 b-values are sorted and grouped by single linkage: consecutive values closer than ``tolerance`` belong to
    the same shell, so acquisitions whose nominal b-value is perturbed by the gradient nonlinearity or by per-direction
    b-matrix rounding (dipy ``small_101D``: 1495…1585) form one shell instead of being split at a rounding boundary.
    The shell value is the group mean rounded to ``round_to``.
    """
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    shells = np.zeros_like(bvals)
    dw = np.flatnonzero(bvals > b0_threshold)
    if dw.size == 0:
        return shells
    order = dw[np.argsort(bvals[dw], kind="stable")]
    sorted_b = bvals[order]
    breaks = np.flatnonzero(np.diff(sorted_b) > tolerance) + 1
    for group in np.split(np.arange(order.size), breaks):
        value = float(np.mean(sorted_b[group]))
        if round_to > 0:
            value = float(np.round(value / round_to) * round_to)
        shells[order[group]] = value
    return shells


def match_shells(
    shell_of_volume: np.ndarray,
    expected: Sequence[float] | None,
    tolerance: float = 100.0,
    min_directions: int = 6,
    source: str = "the DWI series",
    key: str | None = None,
) -> list[float]:
    """Shells to use, in ascending b: the expected ones (matched within ``tolerance``) or every shell found.

    Shells with fewer than ``min_directions`` volumes are dropped with a warning (an l = 2 fit needs 6). When
    ``expected`` is given, a missing expected shell raises (a model trained on b = 1000/2000/3000 cannot take a
    different shell set, and fewer shells would silently give fewer feature channels); the error names ``key`` (the
    config key holding ``expected``, e.g. ``shells``) and the expected shells present in the series, the explicit way
    to opt into fewer features. Found shells that are not expected are ignored with a warning. Returns the *found*
    shell values.
    """
    values, counts = np.unique(shell_of_volume[shell_of_volume > 0], return_counts=True)
    wanted = None if expected is None else sorted(float(x) for x in expected)

    def relevant(v: float) -> bool:
        return wanted is None or any(abs(v - e) <= tolerance for e in wanted)

    usable = []
    for v, c in zip(values.tolist(), counts.tolist()):
        if c >= min_directions:
            usable.append(v)
        elif relevant(v):
            warnings.warn(f"{source}: shell b={v:g} has {c} directions (< {min_directions}); it is dropped", stacklevel=2)
    if wanted is None:
        if not usable:
            raise GradientTableError(f"{source}: no diffusion-weighted shell with at least {min_directions} directions")
        return usable
    chosen = []
    for e in wanted:
        near = [v for v in usable if abs(v - e) <= tolerance]
        if not near:
            msg = (
                f"{source}: expected shell b={e:g} s/mm² (±{tolerance:g}) is missing; usable shells are "
                f"{[round(v) for v in usable]} (all shells and direction counts: "
                f"{dict(zip([round(v) for v in values.tolist()], counts.tolist()))})"
            )
            if key is not None:
                present = [round(w) for w in wanted if any(abs(v - w) <= tolerance for v in usable)]
                msg += (
                    f". Config key '{key}' is {[round(w) for w in wanted]}: {2 * len(wanted)} feature channels, two per shell"
                )
                if present:
                    msg += (
                        f"; to opt into fewer features set '{key}' to {present} ({2 * len(present)} channels; "
                        f"a model trained with the shells {[round(w) for w in wanted]} cannot take them)"
                    )
            raise GradientTableError(msg)
        chosen.append(min(near, key=lambda v: abs(v - e)))
    extra = [round(v) for v in values.tolist() if v not in chosen and not (relevant(v) and v not in usable)]
    if extra:
        warnings.warn(f"{source}: shells {extra} are not among the expected {wanted}; they are ignored", stacklevel=2)
    return chosen


def normalise_b0(
    dwi: np.ndarray,
    bvals: np.ndarray,
    b0_threshold: float = B0_THRESHOLD,
    clip: tuple[float, float] = (0.0, 1.5),
    eps: float = 1e-6,
    channel_axis: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Signal attenuation E = S / S0 with S0 the mean of the b0 volumes.

    E is 0 where S0 ≤ ``eps`` (background) and clipped to ``clip`` (noise makes E > 1 in low-signal voxels).

    Args:
        dwi: DWI series with the volume axis at ``channel_axis``.
        bvals: (N,) b-values.

    Returns:
        (E with the layout of ``dwi``, S0 with the volume axis removed), float32.
    """
    dwi = np.asarray(dwi, dtype=np.float32)
    bvals = np.asarray(bvals).reshape(-1)
    axis = channel_axis % dwi.ndim
    if dwi.shape[axis] != bvals.shape[0]:
        raise GradientTableError(f"the DWI series has {dwi.shape[axis]} volumes but {bvals.shape[0]} b-values were given")
    b0 = bvals <= b0_threshold
    if not np.any(b0):
        raise GradientTableError(f"no b0 volume (b ≤ {b0_threshold:g} s/mm²) to normalise with")
    s0 = np.take(dwi, np.flatnonzero(b0), axis=axis).mean(axis=axis)
    valid = s0 > eps
    denom = np.where(valid, s0, 1.0)
    e = dwi / np.expand_dims(denom, axis)
    e = np.where(np.expand_dims(valid, axis), e, 0.0)
    e = np.clip(e, clip[0], clip[1]).astype(np.float32)
    return e, s0.astype(np.float32)
