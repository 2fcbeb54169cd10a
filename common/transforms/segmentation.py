"""Preprocessing transforms of the segmentation bundles (ImgX-DiffSeg data rules).

* :class:`ResampleToSpacingd`: invertible resampling to a target spacing. MONAI Label 0.8.5 with
  MONAI 1.6.1 crashes when an inference pipeline applies ``Spacingd`` to the key ``image`` (the
  server adds a string ``image_path`` item that ``Spacingd``'s dictionary handling trips over), so
  the bundles wrap the array transform ``Spacing`` in their own dictionary transform. ``Invertd``
  undoes it like ``Spacingd``.
* :func:`intensity_transform`: the spec's intensity rules as MONAI transforms: MR volumes are
  clipped to their 0.5 and 99.5 percentiles and rescaled to [0, 1] (the official v0.2.0+ code uses
  the 0.95th percentile, a slip of a factor 100); CT volumes are clipped to a HU window (AMOS:
  [-991, 362], official ImgX-DiffSeg preprocessing) and rescaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacing,
)
from monai.utils import ensure_tuple_rep

__all__ = ["AMOS_HU_WINDOW", "MR_PERCENTILES", "ResampleToSpacingd", "intensity_transform"]

#: HU window of AMOS CT (official ImgX-DiffSeg AMOS preprocessing).
AMOS_HU_WINDOW: tuple[float, float] = (-991.0, 362.0)
#: Percentiles of the MR intensity rule.
MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """Resample the ``keys`` to ``pixdim`` (mm) with MONAI's ``Spacing``; invertible with ``Invertd``.

    Args:
        keys: keys of channel-first ``MetaTensor`` images.
        pixdim: target spacing, one value per spatial axis (a value <= 0 keeps that axis).
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` for labels).
        padding_mode: padding per key.
        align_corners: per key.
        dtype: computation dtype of the resampling.
        allow_missing_keys: skip absent keys.

    Non-tensor items of the dictionary (paths, ids, strings added by a server) are left alone.
    """

    backend = Spacing.backend

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: Sequence[str] | str = "bilinear",
        padding_mode: Sequence[str] | str = "border",
        align_corners: Sequence[bool] | bool = False,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spacing = Spacing(pixdim=pixdim, dtype=dtype)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.align_corners = ensure_tuple_rep(align_corners, len(self.keys))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode, padding_mode, align_corners in self.key_iterator(d, self.mode, self.padding_mode, self.align_corners):
            d[key] = self.spacing(d[key], mode=mode, padding_mode=padding_mode, align_corners=align_corners)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.spacing.inverse(d[key])
        return d


def intensity_transform(
    keys: KeysCollection,
    modality: str,
    hu_window: Sequence[float] = AMOS_HU_WINDOW,
    percentiles: Sequence[float] = MR_PERCENTILES,
):
    """The intensity rule of a modality as one MONAI dictionary transform (output in [0, 1]).

    ``modality="CT"``: clip to ``hu_window`` and rescale; ``"MR"``: clip each channel to its
    ``percentiles`` and rescale (``ScaleIntensityRangePercentilesd(..., channel_wise=True)``;
    z-scoring first, as the official code does, would change nothing).
    """
    if str(modality).upper() == "CT":
        lo, hi = (float(v) for v in hu_window)
        return ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if str(modality).upper() in ("MR", "MRI"):
        lo, hi = (float(v) for v in percentiles)
        return ScaleIntensityRangePercentilesd(keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    from common.utils.errors import InvalidInputError

    raise InvalidInputError(f"unknown modality {modality!r} (config key 'modality'); expected 'CT' or 'MR'")
