"""MONAI-style dict transforms shared by the bundles.

The bad-input guards (`ValidateImaged`, `ValidateLabeld`, `CheckedLoadImaged`) and the safe
writer (`SafeSaveImaged`) are re-exported here; method-specific transforms live in their own
modules (``common.transforms.segmentation``, ``.dwi``, ``.ivan``, ``.maisi``, ...).
"""

from .saving import SafeSaveImage, SafeSaveImaged
from .validation import CheckedLoadImaged, ValidateImaged, ValidateLabeld, load_nifti_checked

__all__ = ["CheckedLoadImaged", "SafeSaveImage", "SafeSaveImaged", "ValidateImaged", "ValidateLabeld", "load_nifti_checked"]
