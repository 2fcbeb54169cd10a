"""Rigid intra-subject registration with ITK (IXI T1 onto the T2/PD grid).

IXI's T2 and PD are the two echoes of one dual-echo acquisition and share a grid; T1 is acquired
separately, so it is registered to T2 and resampled onto the T2 grid. The recipe is the one of the
project's method specs (ALDM translation section 5, IVAN fusion section 5):

- ``VersorRigid3DTransform`` (rotation as a versor + translation, 6 parameters), initialised by
  ``CenteredTransformInitializer`` in geometry mode (centres of the two fields of view aligned);
- Mattes mutual information (Mattes et al., IEEE TMI 22(1):120-128, 2003) with 50 histogram bins
  on a random 20 % of the fixed voxels (seeded), suited to different contrasts;
- regular-step gradient descent with physical-shift parameter scales;
- a 3-level pyramid: shrink factors 4/2/1, Gaussian smoothing 2/1/0 mm;
- linear resampling of the moving image onto the fixed grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import itk
import numpy as np
from common.utils.io import atomic_path

__all__ = ["RigidResult", "rigid_register"]


@dataclass
class RigidResult:
    """Outcome of :func:`rigid_register`.

    Attributes:
        out_path: the moving image resampled onto the fixed grid.
        matrix: 3x3 rotation of the fitted transform (ITK convention: it maps *fixed* physical
            points, LPS mm, to *moving* physical points).
        center: its centre of rotation (mm, LPS).
        translation: its translation (mm, LPS).
        metric: final Mattes mutual-information value (more negative is better).
        iterations: iterations run at the last pyramid level.
    """

    out_path: Path
    matrix: np.ndarray
    center: np.ndarray
    translation: np.ndarray
    metric: float
    iterations: int

    def transform_point(self, point_lps: np.ndarray) -> np.ndarray:
        """Map fixed-space physical points (``(..., 3)``, LPS mm) to moving space."""
        p = np.asarray(point_lps, dtype=np.float64)
        return (p - self.center) @ self.matrix.T + self.center + self.translation


def rigid_register(
    moving_path: str | os.PathLike,
    fixed_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    shrink_factors: tuple[int, int, int] = (4, 2, 1),
    smoothing_mm: tuple[float, float, float] = (2.0, 1.0, 0.0),
    iterations: int = 200,
    histogram_bins: int = 50,
    sampling: float = 0.2,
    seed: int = 0,
    num_threads: int | None = 1,
) -> RigidResult:
    """Rigidly register ``moving_path`` onto ``fixed_path`` and write the resampled moving image.

    Args:
        moving_path: image to move (e.g. IXI T1).
        fixed_path: reference image whose grid the output takes (e.g. IXI T2).
        out_path: output file (any ITK-writable format, e.g. ``.nii.gz``); written to a temporary
            name in the same folder and renamed, so a reader never sees a partial file.
        shrink_factors: pyramid shrink factor per level (coarse to fine).
        smoothing_mm: Gaussian smoothing sigma per level, in mm.
        iterations: maximum optimiser iterations per level.
        histogram_bins: Mattes mutual-information bins.
        sampling: fraction of fixed voxels sampled (random, seeded) for the metric.
        seed: seed of the metric sampling.
        num_threads: ITK threads during the call (ITK's global default is restored afterwards);
            1 (default) makes the random sampling and so the result exactly reproducible (byte-
            identical output); ``None`` keeps ITK's default.

    Returns:
        A :class:`RigidResult`.
    """
    moving_path, fixed_path, out_path = Path(moving_path), Path(fixed_path), Path(out_path)
    for p in (moving_path, fixed_path):
        if not p.is_file():
            raise FileNotFoundError(f"image to register not found: '{p}'")
    if len(shrink_factors) != len(smoothing_mm):
        raise ValueError("shrink_factors and smoothing_mm need one value per pyramid level")
    previous_threads = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    if num_threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(num_threads))
    try:
        return _register(
            moving_path, fixed_path, out_path, shrink_factors, smoothing_mm, iterations, histogram_bins, sampling, seed
        )
    finally:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(previous_threads)


def _register(
    moving_path: Path,
    fixed_path: Path,
    out_path: Path,
    shrink_factors: tuple[int, ...],
    smoothing_mm: tuple[float, ...],
    iterations: int,
    histogram_bins: int,
    sampling: float,
    seed: int,
) -> RigidResult:
    image_type = itk.Image[itk.F, 3]
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)

    transform_type = itk.VersorRigid3DTransform[itk.D]
    initial = transform_type.New()
    initializer = itk.CenteredTransformInitializer[transform_type, image_type, image_type].New(
        Transform=initial, FixedImage=fixed, MovingImage=moving
    )
    initializer.GeometryOn()
    initializer.InitializeTransform()

    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New()
    metric.SetNumberOfHistogramBins(histogram_bins)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    optimizer.SetLearningRate(1.0)
    optimizer.SetMinimumStepLength(1e-3)
    optimizer.SetRelaxationFactor(0.5)
    optimizer.SetNumberOfIterations(int(iterations))
    optimizer.SetGradientMagnitudeTolerance(1e-6)
    optimizer.SetScalesEstimator(scales)
    # Estimate the learning rate at the start of each level, not at every iteration: the first
    # step then moves about one voxel of that level's grid (the scales estimator's default).
    optimizer.SetDoEstimateLearningRateAtEachIteration(False)
    optimizer.SetDoEstimateLearningRateOnce(True)

    registration = itk.ImageRegistrationMethodv4[image_type, image_type].New(
        FixedImage=fixed, MovingImage=moving, Metric=metric, Optimizer=optimizer, InitialTransform=initial
    )
    registration.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    registration.SetMetricSamplingPercentage(float(sampling))
    registration.MetricSamplingReinitializeSeed(int(seed))
    registration.SetNumberOfLevels(len(shrink_factors))
    registration.SetShrinkFactorsPerLevel([int(s) for s in shrink_factors])
    registration.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_mm])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    registration.InPlaceOn()
    registration.Update()

    # InPlaceOn: the optimised transform is ``initial`` itself; the cast gives back its typed
    # (versor) interface, which the base-class pointer returned by the method hides.
    final = transform_type.cast(registration.GetModifiableTransform())
    resampled = itk.resample_image_filter(
        moving,
        transform=final,
        use_reference_image=True,
        reference_image=fixed,
        default_pixel_value=0.0,
        interpolator=itk.LinearInterpolateImageFunction[image_type, itk.D].New(),
    )
    with atomic_path(out_path) as tmp:
        itk.imwrite(resampled, str(tmp), compression=True)

    matrix = np.array(itk.array_from_matrix(final.GetMatrix()), dtype=np.float64)
    center = np.array(list(final.GetCenter()), dtype=np.float64)
    translation = np.array(list(final.GetTranslation()), dtype=np.float64)
    return RigidResult(
        out_path=out_path,
        matrix=matrix,
        center=center,
        translation=translation,
        metric=float(optimizer.GetValue()),
        iterations=int(optimizer.GetCurrentIteration()),
    )
