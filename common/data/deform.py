"""Random smooth spatial deformations for building synthetic cohorts from one real volume.

A deformation is a *pull-back* map: for every voxel of the output grid it stores the (continuous)
voxel coordinate of the input volume to sample. The output lives on the same voxel grid as the
input, so the input affine and spacing stay valid for every deformed volume; only the anatomy
moves. The map is the composition of

1. a random affine transform in world (mm) coordinates about the centre of the field of view
   (rotation, anisotropic scaling, translation), so that anisotropic voxels deform correctly, and
2. a smooth random displacement field: Gaussian control-point displacements on a coarse grid
   (spacing ``control_spacing_mm``) interpolated with cubic B-splines, i.e. a free-form
   deformation in the sense of Rueckert et al., IEEE TMI 18(8):712-721, 1999.

The same :class:`Deformation` is applied to every image of a subject (linear interpolation) and to
its label maps (nearest neighbour), which keeps images and labels consistent. Everything is seeded
through a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Deformation",
    "DeformationParams",
    "random_affine_matrix",
    "random_displacement",
    "random_deformation",
    "spline_upsample",
]


@dataclass(frozen=True)
class DeformationParams:
    """Ranges of the random deformation.

    Attributes:
        rotate_deg: maximum absolute rotation about each axis, degrees (uniform).
        scale: maximum relative scaling per axis (uniform in ``[1 - scale, 1 + scale]``).
        translate_mm: maximum absolute translation per axis, mm (uniform).
        control_spacing_mm: spacing of the B-spline control grid, mm; larger is smoother.
        displacement_mm: standard deviation of the control-point displacements, mm.
    """

    rotate_deg: float = 6.0
    scale: float = 0.06
    translate_mm: float = 4.0
    control_spacing_mm: float = 40.0
    displacement_mm: float = 2.5


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine_matrix(rng: np.random.Generator, params: DeformationParams) -> np.ndarray:
    """A random 4x4 world-space affine (rotation, scaling, translation) about the origin.

    The caller conjugates it with a translation to the centre of the field of view.
    """
    angles = np.deg2rad(rng.uniform(-params.rotate_deg, params.rotate_deg, size=3))
    scales = rng.uniform(1.0 - params.scale, 1.0 + params.scale, size=3)
    shift = rng.uniform(-params.translate_mm, params.translate_mm, size=3)
    mat = np.eye(4)
    mat[:3, :3] = _rotation(angles) @ np.diag(scales)
    mat[:3, 3] = shift
    return mat


def _spline_matrix(n_ctrl: int, n_out: int) -> np.ndarray:
    """``(n_out, n_ctrl)`` matrix of 1D cubic-spline interpolation from ``n_ctrl`` control points
    onto ``n_out`` samples, the first and last control points on the first and last samples."""
    eye = np.eye(n_ctrl)
    cols = [ndimage.zoom(eye[k], n_out / n_ctrl, order=3, mode="nearest", grid_mode=False) for k in range(n_ctrl)]
    return np.stack(cols, axis=1)


def spline_upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic B-spline interpolation of a coarse 3D control grid onto a grid of ``shape``.

    Equal to ``ndimage.zoom(coarse, order=3, grid_mode=False)`` (spline interpolation is separable
    and linear), computed as a tensor product of three small 1D matrices, which is far faster on
    full-size volumes.
    """
    mats = [_spline_matrix(c, s) for c, s in zip(coarse.shape, shape[:3])]
    return np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True).astype(np.float32)


def random_displacement(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, params: DeformationParams
) -> np.ndarray:
    """A smooth random displacement field in mm, shape ``(3, *shape)``.

    Control points every ``control_spacing_mm`` (at least 4 per axis so that the cubic B-spline has
    support) get Gaussian displacements that :func:`spline_upsample` interpolates onto the grid.
    """
    extent = np.asarray(shape) * np.asarray(spacing)
    n_ctrl = tuple(int(max(4, np.ceil(e / params.control_spacing_mm) + 1)) for e in extent)
    field = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        field[axis] = spline_upsample(rng.normal(0.0, params.displacement_mm, size=n_ctrl), shape)
    return field


@dataclass
class Deformation:
    """A pull-back voxel map on a fixed grid.

    Attributes:
        coords: ``(3, X, Y, Z)`` float32 input-voxel coordinates sampled for each output voxel.
    """

    coords: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.coords.shape[1:])  # type: ignore[return-value]

    def apply(self, volume: np.ndarray, order: int = 1, cval: float | None = None) -> np.ndarray:
        """Resample ``volume`` (3D, or 4D with channels last) through the deformation.

        Args:
            volume: array on the grid the deformation was built for.
            order: 1 for images (linear), 0 for label maps (nearest neighbour).
            cval: value outside the input field of view; default the volume minimum (air for CT,
                background for MRI) so no artificial edge appears.

        Returns:
            The deformed array, same shape and dtype as ``volume``.
        """
        if volume.shape[:3] != self.shape:
            raise ValueError(f"volume shape {volume.shape} does not match the deformation grid {self.shape}")
        fill = float(volume.min()) if cval is None else float(cval)
        if volume.ndim == 4:
            return np.stack([self.apply(volume[..., k], order, fill) for k in range(volume.shape[3])], axis=-1)
        src = volume if order == 0 else volume.astype(np.float32, copy=False)
        out = ndimage.map_coordinates(src, self.coords, order=order, mode="constant", cval=fill, prefilter=False)
        return out.astype(volume.dtype, copy=False)


def random_deformation(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    params: DeformationParams | None = None,
) -> Deformation:
    """Sample a random affine + B-spline deformation for a volume with the given grid.

    Args:
        rng: the random generator (seed it for reproducible cohorts).
        shape: spatial shape of the volumes.
        affine: their 4x4 voxel-to-world affine (mm); the deformation is defined in world space so
            anisotropic or flipped voxel axes are handled correctly.
        params: ranges; defaults to :class:`DeformationParams`.

    Returns:
        A :class:`Deformation` on the same grid (the output affine is ``affine``).
    """
    params = params or DeformationParams()
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    centre_vox = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    centre_world = affine[:3, :3] @ centre_vox + affine[:3, 3]
    to_centre = np.eye(4)
    to_centre[:3, 3] = -centre_world
    back = np.eye(4)
    back[:3, 3] = centre_world
    world_map = back @ random_affine_matrix(rng, params) @ to_centre
    disp = random_displacement(rng, shape, spacing, params)

    # Output voxel -> world -> (affine transform + displacement) -> input voxel.
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ grid + affine[:3, 3:4]
    world = world_map[:3, :3] @ world + world_map[:3, 3:4] + disp.reshape(3, -1)
    inv = np.linalg.inv(affine)
    vox = inv[:3, :3] @ world + inv[:3, 3:4]
    return Deformation(coords=vox.reshape(3, *shape).astype(np.float32))
