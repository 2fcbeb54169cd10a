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
