"""Preprocessing transforms of the segmentation bundles (ImgX-DiffSeg data rules).

* :class:`ResampleToSpacingd`: invertible resampling to a target spacing. MONAI Label 0.8.5 with
  MONAI 1.6.1 crashes when an inference pipeline applies ``Spacingd`` to the key ``image`` (the
  server adds a string ``image_path`` item that ``Spacingd``'s dictionary handling trips over), so
  the bundles wrap the array transform ``Spacing`` in their own dictionary transform. ``Invertd``
  undoes it like ``Spacingd``.
* :class:`RandFieldOfViewd`: random slab / in-plane field of view, with air or the repeated edge
  slices outside, so a model meets at training time the framings of users' scans (thin slabs,
  tight or wide fields of view) as the sliding-window inferer pads them.
* :class:`RemoveSmallComponentsd`: post-processing of a label map that removes, per class,
  connected components smaller than a physical volume (stray islands a sliding window leaves at
  the cut of a thin scan), as TotalSegmentator and nnU-Net post-process theirs.
* :func:`intensity_transform`: the spec's intensity rules as MONAI transforms: MR volumes are
  clipped to their 0.5 and 99.5 percentiles and rescaled to [0, 1] (the official v0.2.0+ code uses
  the 0.95th percentile, a slip of a factor 100); CT volumes are clipped to a HU window (AMOS:
  [-991, 362], official ImgX-DiffSeg preprocessing) and rescaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    RandomizableTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacing,
)
from monai.utils import ensure_tuple_rep

__all__ = [
    "AMOS_HU_WINDOW",
    "MR_PERCENTILES",
    "RandFieldOfViewd",
    "RemoveSmallComponentsd",
    "ResampleToSpacingd",
    "intensity_transform",
]

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


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """Random field of view: keep a random box of the body and blank everything outside it.

    A user's scan never has the training scans' framing: it may be a thin slab, a tighter
    in-plane field of view, or a volume with a wide margin of air. Sliding-window inference then
    shows the network windows where the body ends abruptly in padding. This transform makes such
    windows part of training: with probability ``prob`` it keeps a slab of ``slab_size`` voxels
    along ``slab_axis`` (drawn within the body's extent) and, with probability ``inplane_prob``,
    an in-plane window of ``inplane_fraction`` of the body's extent along the other axes. Outside
    the kept box, ``fill_mode`` says what the network sees, and it should be what the inferer's
    ``padding_mode`` produces when it pads a small scan up to one window:

    * ``"constant"``: every key is set to its ``fill`` value (the air value of the normalised
      image, background for labels), as air padding (``padding_mode: constant``) shows a scan;
    * ``"replicate"``: every key repeats the kept box's nearest edge voxel along each cut axis,
      as ``torch.nn.functional.pad(..., mode="replicate")`` (``padding_mode: replicate``) does.
      A model trained on air-filled cuts but served with edge padding never saw that framing.
      (Measured on the diffseg demo model, matching the two did not by itself close the gap on
      TotalSegmentator's 30-slice crop: see the diffseg model card.)

    The body is where ``image_key`` exceeds ``body_threshold`` (air is 0 after the CT intensity
    rule). Shapes: channel-first ``(C, *S)`` arrays or tensors, unchanged.

    Args:
        keys: keys to blank (image and label).
        image_key: key whose foreground defines the body's extent.
        prob: probability of a slab cut.
        slab_size: (min, max) slab thickness in voxels, inclusive.
        slab_axis: spatial axis of the slab (2: superior-inferior for RAS volumes).
        slab_anchor_prob: probability that a slab keeps one end of the body's extent along
            ``slab_axis`` (either end, equally likely) instead of starting anywhere: a scan of the upper
            abdomen only, or of the pelvis only, ends where the training scans end. Uniform starts show
            such a slab about once in ``extent - slab_size`` cuts.
        inplane_prob: probability of an in-plane cut (independent of the slab).
        inplane_fraction: (min, max) fraction of the body's extent kept along each other axis.
        fill: value outside the kept box, one per key (``fill_mode="constant"``).
        fill_mode: ``"constant"`` (``fill``) or ``"replicate"`` (the kept box's edge voxels).
        body_threshold: foreground threshold on ``image_key``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        prob: float = 0.3,
        slab_size: Sequence[int] = (8, 32),
        slab_axis: int = 2,
        slab_anchor_prob: float = 0.0,
        inplane_prob: float = 0.2,
        inplane_fraction: Sequence[float] = (0.5, 0.9),
        fill: Sequence[float] | float = 0.0,
        body_threshold: float = 0.0,
        fill_mode: str = "constant",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if fill_mode not in ("constant", "replicate"):
            raise ValueError(f"fill_mode must be 'constant' or 'replicate', got {fill_mode!r}")
        self.fill_mode = fill_mode
        RandomizableTransform.__init__(self, prob)
        lo, hi = (int(v) for v in slab_size)
        if not 1 <= lo <= hi:
            raise ValueError(f"slab_size must be (min, max) with 1 <= min <= max, got {slab_size}")
        flo, fhi = (float(v) for v in inplane_fraction)
        if not 0.0 < flo <= fhi <= 1.0:
            raise ValueError(f"inplane_fraction must be (min, max) within (0, 1], got {inplane_fraction}")
        self.image_key, self.slab_axis = image_key, int(slab_axis)
        self.slab_size, self.inplane_fraction = (lo, hi), (flo, fhi)
        self.inplane_prob, self.body_threshold = float(inplane_prob), float(body_threshold)
        if not 0.0 <= float(slab_anchor_prob) <= 1.0:
            raise ValueError(f"slab_anchor_prob must be within [0, 1], got {slab_anchor_prob}")
        self.slab_anchor_prob = float(slab_anchor_prob)
        self.fill = ensure_tuple_rep(fill, len(self.keys))
        self._box: list[slice] | None = None

    def randomize(self, extent: Sequence[tuple[int, int]]) -> None:
        """Draw the kept box within ``extent`` (per spatial axis: first and last body voxel)."""
        super().randomize(None)
        cut_slab = self._do_transform
        cut_plane = self.R.rand() < self.inplane_prob
        self._box = None
        if not (cut_slab or cut_plane):
            return
        box = [slice(None)] * len(extent)
        for axis, (first, last) in enumerate(extent):
            length = last - first + 1
            if axis == self.slab_axis and cut_slab:
                size = int(self.R.randint(self.slab_size[0], self.slab_size[1] + 1))
            elif axis != self.slab_axis and cut_plane:
                size = int(round(length * self.R.uniform(*self.inplane_fraction)))
            else:
                continue
            size = max(1, min(size, length))
            # the draw for anchoring only happens when it is enabled: the random stream (and so every
            # earlier run's augmentation) is unchanged with the default 0
            if axis == self.slab_axis and self.slab_anchor_prob > 0 and self.R.rand() < self.slab_anchor_prob:
                start = first if self.R.rand() < 0.5 else last - size + 1
            else:
                start = first + int(self.R.randint(0, length - size + 1))
            box[axis] = slice(start, start + size)
        self._box = box

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key]
        body = torch.as_tensor(image).detach().amax(dim=0) > self.body_threshold
        if not bool(body.any()):
            super().randomize(None)  # keep the random stream aligned whatever the content
            self._box = None
            return d
        extent = []
        for axis in range(body.ndim):
            other = tuple(a for a in range(body.ndim) if a != axis)
            hits = torch.nonzero(body.any(dim=other) if other else body).flatten()
            extent.append((int(hits[0]), int(hits[-1])))
        self.randomize(extent)
        if self._box is None:
            return d
        for key, fill in self.key_iterator(d, self.fill):
            x = d[key]
            if self.fill_mode == "replicate":
                d[key] = self._replicate_edges(x)
                continue
            kept = x[(slice(None), *self._box)].clone() if isinstance(x, torch.Tensor) else x[(slice(None), *self._box)].copy()
            x = x.clone() if isinstance(x, torch.Tensor) else x.copy()
            x[...] = fill
            x[(slice(None), *self._box)] = kept
            d[key] = x
        return d

    def _replicate_edges(self, x):
        """``x`` with every voxel outside the kept box replaced by the box's nearest edge voxel."""
        for axis, kept in enumerate(self._box or []):
            if kept.start is None:
                continue
            nearest = torch.arange(x.shape[axis + 1]).clamp(kept.start, kept.stop - 1)
            if isinstance(x, torch.Tensor):
                x = x.index_select(axis + 1, nearest.to(x.device))
            else:
                x = x.take(nearest.numpy(), axis=axis + 1)
        return x


class RemoveSmallComponentsd(MapTransform):
    """Set to background every connected component of a foreground class smaller than ``min_size_mm3``.

    A label map ``(1, *S)`` (integer class ids, e.g. after ``AsDiscreted(argmax=True)``) on a grid
    whose voxel volume comes from an affine: that of ``affine_key`` (the preprocessed image, whose
    grid the prediction shares: an engine's prediction need not carry the image's meta data), else
    the label map's own (a ``MetaTensor``), else ``pixdim``. Each foreground
    class is labelled on its own (face connectivity), so a class whose only voxels are a stray
    island is removed entirely, and an organ split in two by the edge of a slab keeps both parts
    if each is at least ``min_size_mm3``. ``min_size_mm3 <= 0`` returns the input unchanged.
    The meta data (affine, applied operations) is kept, so ``Invertd`` still undoes the
    preprocessing afterwards.

    Args:
        keys: label-map keys.
        min_size_mm3: smallest kept component, in cubic millimetres.
        affine_key: key of a ``MetaTensor`` on the same grid whose affine gives the voxel volume.
        pixdim: voxel size when neither carries an affine (plain tensors or arrays).
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size_mm3: float = 0.0,
        affine_key: str | None = None,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size_mm3, self.affine_key = float(min_size_mm3), affine_key
        self.pixdim = None if pixdim is None else [float(v) for v in pixdim]

    def _voxel_mm3(self, x) -> float:
        if isinstance(x, MetaTensor):
            affine = np.asarray(x.affine, dtype=np.float64)
            n = affine.shape[0] - 1
            return float(abs(np.linalg.det(affine[:n, :n])))
        if self.pixdim is None:
            raise ValueError("RemoveSmallComponentsd needs a MetaTensor (with its affine) or pixdim")
        return float(np.prod(self.pixdim))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from scipy import ndimage

        d = dict(data)
        if self.min_size_mm3 <= 0:
            return d
        for key in self.key_iterator(d):
            x = d[key]
            if x.shape[0] != 1:
                raise ValueError(f"RemoveSmallComponentsd: '{key}' must be a label map (1, *S), got shape {tuple(x.shape)}")
            ref = d[self.affine_key] if self.affine_key is not None and isinstance(d.get(self.affine_key), MetaTensor) else x
            min_voxels = self.min_size_mm3 / self._voxel_mm3(ref)
            labels = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)[0]
            remove = np.zeros(labels.shape, dtype=bool)
            for c in np.unique(labels):
                if c == 0:
                    continue
                parts, n = ndimage.label(labels == c)
                sizes = np.bincount(parts.ravel(), minlength=n + 1)
                small = np.flatnonzero(sizes < min_voxels)
                small = small[small > 0]
                if small.size:
                    remove |= np.isin(parts, small)
            if remove.any():
                out = x.clone() if isinstance(x, torch.Tensor) else x.copy()
                out[0][torch.as_tensor(remove) if isinstance(x, torch.Tensor) else remove] = 0
                d[key] = out
        return d
