"""Transforms of the iVAN bundle: variable augmentation and the reference-fusion target.

Variable augmentation (Wang et al., IEEE JBHI 2023, "Variable Augmented Network for Invertible Modality
Synthesis and Fusion"): an invertible network has as many output as input channels, so the source stack
``X`` (``n_in`` modalities) and the target stack ``Y`` (``n_out`` modalities) are both brought to ``C``
channels, ``C = max(2, n_in, n_out)`` rounded up to even. Three schemes (``mode``):

- ``"replicate"`` (the official code; default): ``X_aug[c] = X[c mod n_in]``, ``Y_aug[c] = Y[c mod n_out]``;
  a prediction is read back as the channel-group mean (channels ``c`` with ``c mod n == j`` give output ``j``).
- ``"dummy_copy"`` (the paper's wording, "dummy variables ... copied to the output"): input deficit channels
  replicate the inputs; target deficit channels are copies of the augmented input channels at the same index
  (``[T1, PD] -> [T2, PD]``); a prediction is the first ``n`` channels.
- ``"zeros"``: deficit channels are zeros in input and target; a prediction is the first ``n`` channels.

Reference fusion (the official code never defines the "reference fusion image"; project choice): a classical
Laplacian-pyramid fusion (Burt & Adelson 1983; Burt & Kolczynski 1993) with the max-abs rule on the detail
levels and the mean of the sources on the base level, computed per 2D slice.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple

from common.networks.ivan import group_mean

__all__ = [
    "AUGMENTATION_MODES",
    "augmented_channels",
    "augment_sources",
    "augment_targets",
    "deaugment",
    "VariableAugmentd",
    "VariableDeaugmentd",
    "laplacian_levels",
    "laplacian_pyramid",
    "collapse_pyramid",
    "laplacian_maxabs_fusion",
    "average_fusion",
    "FusionTargetd",
    "ValidateSlicesd",
    "AsSliceVolumed",
    "ScaleCTWindowd",
    "overlap_fraction",
    "CheckSourceGeometryd",
]

AUGMENTATION_MODES = ("replicate", "dummy_copy", "zeros")


def _check_mode(mode: str) -> None:
    if mode not in AUGMENTATION_MODES:
        raise ValueError(f"augmentation must be one of {AUGMENTATION_MODES}, got {mode!r}")


def augmented_channels(n_in: int, n_out: int, channels: int | None = None) -> int:
    """``C = max(2, n_in, n_out)`` rounded up to even; ``channels`` may force more (it must be even)."""
    c = max(2, int(n_in), int(n_out))
    c += c % 2
    if channels is not None:
        if int(channels) < c or int(channels) % 2:
            raise ValueError(f"channels={channels} must be even and >= {c} for {n_in} -> {n_out}")
        c = int(channels)
    return c


def augment_sources(x: torch.Tensor, channels: int, mode: str = "replicate", dim: int = 0) -> torch.Tensor:
    """``X`` with ``n_in`` channels along ``dim`` -> ``X_aug`` with ``channels`` channels."""
    _check_mode(mode)
    n = x.shape[dim]
    if mode == "zeros":
        if channels == n:
            return x
        shape = list(x.shape)
        shape[dim] = channels - n
        return torch.cat([x, x.new_zeros(shape)], dim=dim)
    idx = torch.tensor([c % n for c in range(channels)], device=x.device)
    return torch.index_select(x, dim, idx)


def augment_targets(
    y: torch.Tensor, channels: int, mode: str = "replicate", sources_aug: torch.Tensor | None = None, dim: int = 0
) -> torch.Tensor:
    """``Y`` with ``n_out`` channels along ``dim`` -> ``Y_aug`` with ``channels`` channels.

    ``dummy_copy`` needs the augmented sources (its deficit channels are copies of them); without them (reverse
    inference from a target alone) the deficit channels replicate the targets, which is the best guess available.
    """
    _check_mode(mode)
    n = y.shape[dim]
    if mode == "dummy_copy" and sources_aug is not None and channels > n:
        rest = sources_aug.narrow(dim, n, channels - n)
        return torch.cat([y, convert_to_dst_type(rest, y)[0]], dim=dim)
    return augment_sources(y, channels, "zeros" if mode == "zeros" else "replicate", dim=dim)


def deaugment(x: torch.Tensor, n: int, mode: str = "replicate") -> torch.Tensor:
    """Batched ``(B, C, ...) -> (B, n, ...)``: channel-group mean (``replicate``) or the first ``n`` channels."""
    _check_mode(mode)
    return group_mean(x, n) if mode == "replicate" else x[:, :n]


class VariableAugmentd(MapTransform):
    """Concatenate single-channel modalities and augment them to ``C`` channels (see the module docstring).

    Forward (``reverse=False``): ``image_key`` <- ``X_aug`` from ``keys`` (the sources, in order) and, when every
    target key is present, ``label_key`` <- ``Y_aug`` from ``target_keys``. Reverse (``reverse=True``): the network
    runs backwards, so ``image_key`` <- ``Y_aug`` and ``label_key`` <- ``X_aug`` when the sources are present.

    Args:
        keys: source modality keys, each ``(1, spatial...)``.
        target_keys: target modality keys (may be missing for forward inference).
        mode: ``"replicate"``, ``"dummy_copy"`` or ``"zeros"``.
        channels: force ``C`` (``None``: the minimum even count).
        image_key, label_key: output keys.
        reverse: build the network input from the targets.
    """

    def __init__(
        self,
        keys: KeysCollection,
        target_keys: KeysCollection,
        mode: str = "replicate",
        channels: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        reverse: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_mode(mode)
        self.target_keys = ensure_tuple(target_keys)
        self.mode = mode
        self.channels = augmented_channels(len(self.keys), len(self.target_keys), channels)
        self.image_key, self.label_key = image_key, label_key
        self.reverse = bool(reverse)

    @staticmethod
    def _stack(d: Mapping, keys: Sequence[Hashable]) -> torch.Tensor | None:
        # a modality that was not loaded (absent, or still a file path) is "not present"
        if not all(k in d and not isinstance(d[k], (str, bytes)) for k in keys):
            return None
        parts = [d[k] if isinstance(d[k], torch.Tensor) else torch.as_tensor(np.asarray(d[k])) for k in keys]
        for k, p in zip(keys, parts):
            if p.shape[0] != 1:
                raise ValueError(f"modality {k!r} must have one channel, got shape {tuple(p.shape)}")
            if p.shape[1:] != parts[0].shape[1:]:
                raise ValueError(f"modality {k!r} has shape {tuple(p.shape)}; expected the grid of {keys[0]!r} {tuple(parts[0].shape)}")
        return torch.cat(parts, dim=0)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        x = self._stack(d, self.keys)
        y = self._stack(d, self.target_keys)
        x_aug = None if x is None else augment_sources(x, self.channels, self.mode)
        y_aug = None if y is None else augment_targets(y, self.channels, self.mode, sources_aug=x_aug)
        first, second = (y_aug, x_aug) if self.reverse else (x_aug, y_aug)
        if first is None:
            needed = self.target_keys if self.reverse else self.keys
            raise KeyError(f"VariableAugmentd needs the keys {list(needed)}; got {sorted(map(str, d))}")
        d[self.image_key] = first
        if second is not None:
            d[self.label_key] = second
        return d


class VariableDeaugmentd(MapTransform):
    """Read ``n`` modalities back from ``C``-channel tensors ``(C, spatial...)`` (channel-group mean or first ``n``)."""

    def __init__(self, keys: KeysCollection, n: int, mode: str = "replicate", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_mode(mode)
        self.n, self.mode = int(n), mode

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = deaugment(d[key][None], self.n, self.mode)[0]
        return d


# ----------------------------------------------------------------------------------------------------------------
# Laplacian pyramid (Burt & Adelson, "The Laplacian pyramid as a compact image code", IEEE Trans. Commun. 1983)

_BURT_ADELSON = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap Burt-Adelson filter with reflect padding on ``(N, H, W)``."""
    w = _BURT_ADELSON.to(dtype=x.dtype, device=x.device)
    y = F.pad(x[:, None], (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, w.view(1, 1, 1, 5))
    y = F.conv2d(y, w.view(1, 1, 5, 1))
    return y[:, 0]


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, ::2, ::2]


def _up(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero insertion to ``shape`` then 4 * blur (the factor 4 restores the mean lost to the zeros)."""
    z = torch.zeros((x.shape[0], *shape), dtype=x.dtype, device=x.device)
    z[:, ::2, ::2] = x
    return 4.0 * _blur(z)


def laplacian_levels(shape: Sequence[int], levels: int = 4, min_size: int = 8) -> int:
    """``levels`` reduced until the coarsest image has both sides >= ``min_size``."""
    levels = int(levels)
    while levels > 0 and min(math.ceil(s / 2**levels) for s in shape) < min_size:
        levels -= 1
    return levels


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``(N, H, W) -> [L_0, ..., L_{levels-1}, G_levels]`` with ``L_l = G_l - up(G_{l+1})``."""
    pyr, g = [], x
    for _ in range(levels):
        g_next = _down(g)
        pyr.append(g - _up(g_next, g.shape[-2:]))
        g = g_next
    pyr.append(g)
    return pyr


def collapse_pyramid(pyr: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`laplacian_pyramid`: ``G_l = L_l + up(G_{l+1})`` from the base upwards."""
    g = pyr[-1]
    for lap in reversed(pyr[:-1]):
        g = lap + _up(g, lap.shape[-2:])
    return g


def laplacian_maxabs_fusion(sources: torch.Tensor, levels: int = 4, min_size: int = 8) -> torch.Tensor:
    """Fuse ``S`` co-registered images ``(S, N, H, W)`` (values in [0,1]) into ``(N, H, W)``.

    Per detail level, each pixel takes the coefficient of the source with the largest ``|L_l|``; the base level is
    the mean of the sources' ``G_L``; the collapsed pyramid is clipped to [0, 1]. ``levels`` is reduced so that
    the coarsest level keeps both sides >= ``min_size``. Computed in float64, returned in the input dtype.
    """
    src = sources.double()
    n_levels = laplacian_levels(src.shape[-2:], levels, min_size)
    pyrs = [laplacian_pyramid(s, n_levels) for s in src]
    fused = []
    for lvl in range(n_levels):
        coeffs = torch.stack([p[lvl] for p in pyrs])  # (S, N, H, W)
        pick = coeffs.abs().argmax(dim=0, keepdim=True)
        fused.append(torch.gather(coeffs, 0, pick)[0])
    fused.append(torch.stack([p[-1] for p in pyrs]).mean(dim=0))
    return collapse_pyramid(fused).clamp(0.0, 1.0).to(sources.dtype)


def average_fusion(sources: torch.Tensor) -> torch.Tensor:
    """Pixel-wise mean of ``(S, ...)`` sources."""
    return sources.mean(dim=0)


class FusionTargetd(MapTransform):
    """Write the reference fusion image of the source modalities ``keys`` into ``output_key``.

    Inputs ``(1, H, W)`` or ``(1, H, W, D)``; volumes are fused slice by slice along ``slice_axis`` (a spatial
    axis, default the last), exactly as if each 2D slice were fused on its own.

    ``method``: ``"laplacian_maxabs"`` (default), ``"average"``, or ``"datalist"`` (the reference is supplied by
    the datalist in ``output_key``; the transform only checks that it is there).
    """

    methods = ("laplacian_maxabs", "average", "datalist")

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str = "fused",
        method: str = "laplacian_maxabs",
        levels: int = 4,
        slice_axis: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in self.methods:
            raise ValueError(f"fusion target must be one of {self.methods}, got {method!r}")
        self.output_key, self.method, self.levels, self.slice_axis = output_key, method, int(levels), int(slice_axis)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.method == "datalist":
            if self.output_key not in d:
                raise KeyError(f"fusion_target 'datalist' needs the key {self.output_key!r} in every item")
            return d
        imgs = [torch.as_tensor(d[k]) for k in self.key_iterator(d)]
        src = torch.stack([torch.as_tensor(i, dtype=torch.float32)[0] for i in imgs])  # (S, H, W[, D])
        if src.ndim == 4:
            axis = self.slice_axis % 3 + 1
            src = torch.movedim(src, axis, 1)  # (S, D, a, b)
        else:
            src = src[:, None]
        if self.method == "average":
            out = average_fusion(src)
        else:
            out = laplacian_maxabs_fusion(src, self.levels)
        out = torch.movedim(out, 0, self.slice_axis % 3) if len(imgs[0].shape) == 4 else out[0]
        ref = d[next(iter(self.key_iterator(d)))]
        d[self.output_key] = convert_to_dst_type(out[None], ref, dtype=torch.float32)[0]
        return d


# ----------------------------------------------------------------------------------------------------------------
# Inputs users have: 2D slices (2D NIfTI, one-slice NIfTI, PNG), and sources that must overlap in physical space


class ValidateSlicesd(MapTransform):
    """The shared input guard (:class:`common.transforms.validation.ValidateImaged`) for a 2D network: a 3D volume,
    a single-slice volume ``(1, H, W, 1)`` or a 2D image ``(1, H, W)`` (2D NIfTI, greyscale PNG) is accepted; every
    other check of the guard (channels, NaN/Inf, constant images, ``max_abs``) applies unchanged. A colour image
    (2D with 3 or 4 channels, e.g. an RGB PNG) is refused with :class:`InvalidInputError`.

    Args: as ``ValidateImaged`` (``spatial_dims`` is fixed: 2 or 3 per image).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        from common.transforms.validation import ValidateImaged

        super().__init__(keys, allow_missing_keys)
        kwargs.pop("spatial_dims", None)
        self.v3 = ValidateImaged(keys, spatial_dims=3, allow_missing_keys=allow_missing_keys, **kwargs)
        self.v2 = ValidateImaged(keys, spatial_dims=2, allow_missing_keys=allow_missing_keys, **kwargs)

    @staticmethod
    def _file_shape(img) -> tuple[int, ...]:
        meta = getattr(img, "meta", {}) or {}
        if meta.get("spatial_shape") is not None:
            return tuple(int(s) for s in np.atleast_1d(np.asarray(meta["spatial_shape"])))
        return tuple(int(s) for s in img.shape[1:])

    def __call__(self, data: Mapping) -> dict:
        from monai.data import MetaTensor

        from common.transforms.validation import describe_source
        from common.utils.errors import InvalidInputError

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            file_shape = self._file_shape(img)
            if len(file_shape) == 2:
                if img.ndim == 3 and img.shape[0] in (3, 4):
                    raise InvalidInputError(
                        f"{describe_source(img, key)} is a colour image ({img.shape[0]} channels, spatial shape "
                        f"{file_shape}); expected a greyscale slice (convert it to grey levels first)"
                    )
                self.v2._validate(img, key)
            elif len(file_shape) == 3 and img.ndim == 4 and sum(s == 1 for s in img.shape[1:]) == 1:
                axis = [int(s) for s in img.shape[1:]].index(1)
                flat = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
                view = MetaTensor(flat.select(axis + 1, 0), affine=getattr(img, "affine", None),
                                  meta={"filename_or_obj": (getattr(img, "meta", {}) or {}).get("filename_or_obj"),
                                        "spatial_shape": np.asarray([s for s in file_shape if s != 1] or [1])})
                self.v2._validate(view, key)
            else:
                d[key] = self.v3._validate(img, key)
        return d


#: meta key set by :class:`AsSliceVolumed` on a 2D input made a one-slice volume (kept through ``Invertd``)
FROM_2D_KEY = "ivan_from_2d"


class AsSliceVolumed(MapTransform):
    """A 2D image ``(C, H, W)`` becomes a one-slice volume ``(C, H, W, 1)`` (its 4x4 affine and file name kept,
    ``meta[FROM_2D_KEY]`` set); 3D images, one-slice volumes included, pass unchanged. Place it right after :class:`ValidateSlicesd`, before ``Orientationd``, so that a 2D
    NIfTI or PNG runs through the same 3D pipeline and is written as a one-slice NIfTI."""

    def __call__(self, data: Mapping) -> dict:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 3:
                out = img[..., None]
                if isinstance(img, MetaTensor):
                    out = MetaTensor(img.as_tensor()[..., None], meta=dict(img.meta))  # meta holds the affine
                    out.meta["spatial_shape"] = np.asarray([*img.shape[1:], 1])
                    out.meta[FROM_2D_KEY] = True  # the writer gives a 2D input a 2D output
                d[key] = out
        return d


class ScaleCTWindowd(MapTransform):
    """Map the HU window ``window = (low, high)`` linearly to [0, 1] (clipped) for those of ``keys`` that are CT keys.

    ``keys`` are the keys the workflow loaded, ``ct_keys`` the names that hold CT (HU). Only keys in both are
    scaled: a datalist entry may list other images (a ``ct`` file next to the MR of a T1 -> T2 task) whose
    paths were never loaded and must stay untouched. ``MONAI``'s ``ScaleIntensityRanged`` with
    ``allow_missing_keys`` would scale such a path string and fail.
    """

    def __init__(self, keys: KeysCollection, ct_keys: Sequence[str], window: Sequence[float], clip: bool = True) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(window) != 2 or not float(window[0]) < float(window[1]):
            raise ValueError(f"the CT window must be [low, high] in HU with low < high, got {list(window)}")
        self.ct_keys = set(ensure_tuple(ct_keys))
        self.low, self.high, self.clip = float(window[0]), float(window[1]), bool(clip)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if key in self.ct_keys:
                out = (d[key] - self.low) / (self.high - self.low)
                d[key] = out.clamp(0.0, 1.0) if self.clip else out
        return d


def _corners(shape: Sequence[int]) -> np.ndarray:
    """Voxel-space corners (at the voxel edges, ``-0.5`` and ``n - 0.5``) of a grid, ``(8, 3)``."""
    lo, hi = [-0.5] * 3, [s - 0.5 for s in shape]
    return np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)], dtype=np.float64)


def overlap_fraction(ref_affine, ref_shape: Sequence[int], other_affine, other_shape: Sequence[int],
                     samples: int = 24) -> float:
    """Fraction of the field of view of the grid ``(ref_affine, ref_shape)`` (3D, voxel to world) that lies inside
    the field of view of ``(other_affine, other_shape)``: the share of a regular ``samples``-per-axis grid of points
    spanning the reference voxels (one point per voxel along short axes) whose position, mapped into the other
    image's voxel space, falls within its voxel extent. Exact for axis-aligned grids up to the sampling, and valid
    for oblique ones."""
    ref_affine, other_affine = np.asarray(ref_affine, np.float64), np.asarray(other_affine, np.float64)
    axes = [np.linspace(0, s - 1, min(int(s), samples)) for s in ref_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    to_other = np.linalg.inv(other_affine) @ ref_affine
    ijk = pts @ to_other[:3, :3].T + to_other[:3, 3]
    hi = np.asarray(other_shape, np.float64) - 0.5
    inside = np.all((ijk >= -0.5 - 1e-6) & (ijk <= hi + 1e-6), axis=1)
    return float(inside.mean())


class CheckSourceGeometryd(MapTransform):
    """Geometry checks before the modalities are resampled onto the grid of ``ref_key`` (inputs ``(1, H, W, D)``,
    after ``Orientationd``):

    - every image overlaps the reference's field of view by at least ``min_overlap`` (a fraction; 0.5 = half of
      the reference's field of view lies inside the other image): below it, resampling would fill the reference
      grid with padding or repeated edge values, so the run stops with :class:`InvalidInputError` naming both
      files and the measured overlap;
    - a one-slice image (2D input) has its single slice across ``slice_axis`` (the network runs on the planes
      across that axis), else :class:`InvalidInputError` naming ``slice_axis``.
    """

    def __init__(self, keys: KeysCollection, ref_key: str, min_overlap: float = 0.5, slice_axis: int = 2,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.min_overlap, self.axis = ref_key, float(min_overlap), int(slice_axis) % 3

    def __call__(self, data: Mapping) -> dict:
        from common.transforms.validation import describe_source
        from common.utils.errors import InvalidInputError

        d = dict(data)
        ref = d[self.ref_key]
        ref_shape = tuple(int(s) for s in ref.shape[1:])
        for key in self.key_iterator(d):
            img = d[key]
            shape = tuple(int(s) for s in img.shape[1:])
            if len(shape) == 3 and shape[self.axis] != 1 and sum(s == 1 for s in shape) == 1:
                raise InvalidInputError(
                    f"{describe_source(img, key)} is a single slice across axis {shape.index(1)} (spatial shape "
                    f"{shape} after reorientation to RAS); the network runs on the planes across slice_axis "
                    f"{self.axis}: expected a single slice across that axis (or set 'slice_axis' to {shape.index(1)})"
                )
            if key == self.ref_key:
                continue
            frac = overlap_fraction(ref.affine, ref_shape, img.affine, shape)
            if frac < self.min_overlap:
                raise InvalidInputError(
                    f"{describe_source(img, key)} covers {100 * frac:.1f} % of the field of view of "
                    f"{describe_source(ref, self.ref_key)} in physical space (world coordinates of the two affines); "
                    f"expected at least {100 * self.min_overlap:g} % ('min_overlap'): the images are not of the same "
                    "region or not co-registered"
                )
        return d
