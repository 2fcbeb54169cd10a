"""Evaluation metrics of the bundles.

* :mod:`common.metrics.image`: PSNR, 3D SSIM (MONAI defaults), per-slice PSNR/SSIM (scikit-image
  defaults), NMSE, MAE, Pearson r and the flattened SSIM of the CLDM code, optionally within masks.
* :mod:`common.metrics.segmentation`: per-class Dice, IoU, HD95, NSD, mean surface distance and
  centroid distance with explicit empty-mask conventions, plus per-case rows and their summary.
* :mod:`common.metrics.fusion`: AG, SF, EN, QMI, Q^AB/F (Xydeas-Petrovic) and Piella's Q.
"""

from .fusion import (
    QABF_CONSTANTS,
    average_gradient,
    entropy,
    fusion_metrics,
    piella_q,
    qabf,
    qmi,
    spatial_frequency,
)
from .image import PerSliceResult, flat_ssim, mae, nmse, pearson_r, psnr, psnr_per_slice, ssim3d, ssim_per_slice
from .segmentation import (
    METRIC_NAMES,
    centroid_distance,
    dice,
    hd95,
    iou,
    mean_surface_distance,
    nsd,
    segmentation_metrics,
    summarise,
    surface_distances,
)

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
    "METRIC_NAMES",
    "dice",
    "iou",
    "hd95",
    "nsd",
    "mean_surface_distance",
    "centroid_distance",
    "surface_distances",
    "segmentation_metrics",
    "summarise",
    "QABF_CONSTANTS",
    "average_gradient",
    "spatial_frequency",
    "entropy",
    "qmi",
    "qabf",
    "piella_q",
    "fusion_metrics",
]
