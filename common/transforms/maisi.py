"""MAISI label space, label-to-condition encoding, CT intensity mapping and the organ-intensity quality check.

Sources: MAISI label dictionary (``label_dict.json`` of the MONAI model zoo ``maisi_ct_generative`` /
NV-Generate-CTMR; 132 ids + body 200), ``binarize_labels`` and the HU mapping of the official sampler, the
quality-check table ``image_median_statistics.json`` (MONAI tutorials ``generation/maisi/configs``).
The TotalSegmentator -> MAISI map is name-based (ours): TotalSegmentator v2 names (``kidney_left``,
``rib_left_1``, ``vertebrae_L5``) are rewritten to MAISI names (``left kidney``, ``left rib 1``,
``vertebrae L5``); structures MAISI does not list map to 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = [
    "MAISI_LABELS",
    "BODY_LABEL",
    "TUMOR_LABELS",
    "QC_LABEL_GROUPS",
    "binarize_labels",
    "maisi_name_from_totalsegmentator",
    "totalsegmentator_to_maisi_lut",
    "body_mask_from_ct",
    "to_maisi_label",
    "latent_image_to_hu",
    "apply_body_mask",
    "quality_check",
    "MapToMaisiLabeld",
    "FilterLabelsd",
    "CropAroundLabelsd",
]

_FIRST_NAMES = (
    "liver", "dummy1", "spleen", "pancreas", "right kidney", "aorta", "inferior vena cava", "right adrenal gland",
    "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney", "bladder", "dummy2",
    "portal vein and splenic vein", "dummy3", "small bowel", "dummy4", "dummy5", "brain", "lung tumor",
    "pancreatic tumor", "hepatic vessel", "hepatic tumor", "colon cancer primaries", "left lung upper lobe",
    "left lung lower lobe", "right lung upper lobe", "right lung middle lobe", "right lung lower lobe",
)


def _label_dict() -> dict[str, int]:
    names = list(_FIRST_NAMES)
    names += [f"vertebrae {v}" for v in ["L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]]
    names += [f"vertebrae C{i}" for i in range(7, 0, -1)]
    names += ["trachea", "left iliac artery", "right iliac artery", "left iliac vena", "right iliac vena", "colon"]
    names += [f"left rib {i}" for i in range(1, 13)] + [f"right rib {i}" for i in range(1, 13)]
    for part in ("humerus", "scapula", "clavicula", "femur", "hip"):
        names += [f"left {part}", f"right {part}"]
    names += ["sacrum"]
    for part in ("gluteus maximus", "gluteus medius", "gluteus minimus", "autochthon", "iliopsoas"):
        names += [f"left {part}", f"right {part}"]
    names += ["left atrial appendage", "brachiocephalic trunk", "left brachiocephalic vein", "right brachiocephalic vein"]
    names += ["left common carotid artery", "right common carotid artery", "costal cartilages", "heart"]
    names += ["left kidney cyst", "right kidney cyst", "prostate", "pulmonary vein", "skull", "spinal cord", "sternum"]
    names += ["left subclavian artery", "right subclavian artery", "superior vena cava", "thyroid gland", "vertebrae S1"]
    names += ["bone lesion", "dummy6", "dummy7", "dummy8", "airway"]
    return {name: i + 1 for i, name in enumerate(names)}


#: MAISI label ids (1..132, ``label_dict.json``); the body (any tissue not otherwise labelled) is 200.
MAISI_LABELS: dict[str, int] = _label_dict()
BODY_LABEL = 200
#: lung tumor, pancreatic tumor, hepatic tumor, colon cancer primaries, bone lesion
TUMOR_LABELS = (23, 24, 26, 27, 128)

#: label groups of the official quality check (median HU per group vs ``image_median_statistics.json``)
QC_LABEL_GROUPS: dict[str, list[int]] = {
    "liver": [1],
    "spleen": [3],
    "pancreas": [4],
    "kidney": [5, 14],
    "lung": [28, 29, 30, 31, 32],
    "brain": [22],
    "bone": list(range(33, 57)) + list(range(63, 98)) + [120, 122, 127],
}
# bone's upper limit is the top of the HU window: dense cortical bone saturates at 1000 HU
_QC_FIXED_HIGH = {"bone": 1000.0}

# TotalSegmentator names that the generic rewrite does not turn into the MAISI name
_TS_ALIASES = {"urinary bladder": "bladder"}


def binarize_labels(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Encode an integer label map as ``bits`` binary channels, bit k in channel k (least significant first).

    Args:
        x: label map (N, 1, *spatial) with values in [0, 2**bits).

    Returns:
        float tensor (N, bits, *spatial) with values in {0, 1} (label 200 -> [0,0,0,1,0,0,1,1]).
    """
    if x.ndim < 3 or x.shape[1] != 1:
        raise ValueError(f"expected a label map of shape (N, 1, *spatial), got {tuple(x.shape)}")
    xi = torch.as_tensor(x).long()
    if xi.min() < 0 or xi.max() >= 2**bits:
        raise ValueError(f"label values must lie in [0, {2**bits - 1}], got [{int(xi.min())}, {int(xi.max())}]")
    return torch.cat([(xi >> k) & 1 for k in range(bits)], dim=1).float()


def maisi_name_from_totalsegmentator(name: str) -> str:
    """``kidney_left`` -> ``left kidney``, ``rib_right_3`` -> ``right rib 3``, ``vertebrae_L5`` -> ``vertebrae L5``."""
    tokens = name.split("_")
    side = [t for t in tokens if t in ("left", "right")]
    words = " ".join(t for t in tokens if t not in ("left", "right"))
    out = f"{side[0]} {words}" if side else words
    return _TS_ALIASES.get(out, out)


def totalsegmentator_to_maisi_lut(class_map: Mapping[int, str]) -> np.ndarray:
    """Look-up table ``lut[ts_id] = maisi_id`` (0 for structures MAISI does not list)."""
    lut = np.zeros(max(class_map) + 1, dtype=np.uint8)
    for ts_id, name in class_map.items():
        lut[int(ts_id)] = MAISI_LABELS.get(maisi_name_from_totalsegmentator(name), 0)
    return lut


def body_mask_from_ct(ct_hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Body mask of a CT in HU: voxels above ``threshold``, largest connected component, holes filled (ours)."""
    fg = np.asarray(ct_hu) > threshold
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    body = lab == (int(np.argmax(sizes)) + 1)
    # fill slice by slice along the axial axis: 3D filling cannot close a body open at the volume's ends
    for z in range(body.shape[-1]):
        body[..., z] = ndimage.binary_fill_holes(body[..., z])
    return body


def to_maisi_label(ts_label: np.ndarray, lut: np.ndarray, ct_hu: np.ndarray | None = None) -> np.ndarray:
    """MAISI label map (uint8) from a TotalSegmentator label map; body (200) where the CT is body but unlabelled."""
    ts = np.asarray(ts_label).astype(np.int64)
    out = lut[np.clip(ts, 0, len(lut) - 1)] * (ts < len(lut))
    out = out.astype(np.uint8)
    if ct_hu is not None:
        body = body_mask_from_ct(ct_hu)
        out[(out == 0) & body] = BODY_LABEL
    return out


def latent_image_to_hu(image: torch.Tensor) -> torch.Tensor:
    """Decoded image in the VAE's [0, 1] scale -> HU: clip to [0, 1], then ``x * 2000 - 1000`` (window [-1000, 1000])."""
    return image.clamp(0.0, 1.0) * 2000.0 - 1000.0


def apply_body_mask(image_hu: torch.Tensor, label: torch.Tensor, background: float = -1000.0) -> torch.Tensor:
    """Air (``background`` HU) wherever the label is 0, i.e. outside the body."""
    return torch.where(torch.as_tensor(label) > 0, image_hu, torch.full_like(image_hu, background))


def quality_check(
    image_hu: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    statistics: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, Sequence[int]] = QC_LABEL_GROUPS,
) -> dict[str, dict[str, Any]]:
    """Organ-intensity quality check: median HU of each organ group must lie in [low, high].

    ``low = min(sigma_6_low, percentile_0_5)`` and ``high = max(sigma_6_high, percentile_99_5)`` of the
    statistics table (bone: ``high = 1000``). Groups absent from the label pass (``median`` is None).

    Returns:
        ``{group: {"median": float | None, "low": float, "high": float, "passed": bool}}``.
    """
    img = torch.as_tensor(image_hu).detach().cpu().float().numpy().reshape(-1)
    lab = torch.as_tensor(label).detach().cpu().numpy().reshape(-1)
    if img.shape != lab.shape:
        raise ValueError(f"image and label differ in size: {img.size} vs {lab.size} voxels")
    out: dict[str, dict[str, Any]] = {}
    for name, stats in statistics.items():
        low = min(float(stats["sigma_6_low"]), float(stats["percentile_0_5"]))
        high = _QC_FIXED_HIGH.get(name, max(float(stats["sigma_6_high"]), float(stats["percentile_99_5"])))
        values = img[np.isin(lab, list(groups.get(name, [])))]
        median = float(np.median(values)) if values.size else None
        passed = median is None or (low <= median <= high)
        out[name] = {"median": median, "low": low, "high": high, "passed": bool(passed)}
    return out


class MapToMaisiLabeld(MapTransform):
    """Dict transform: TotalSegmentator label map -> MAISI ids (+ body 200 from the CT under ``image_key``)."""

    def __init__(self, keys: KeysCollection, class_map: Mapping[int, str], image_key: str | None = None) -> None:
        super().__init__(keys)
        self.lut = totalsegmentator_to_maisi_lut(class_map)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ct = None if self.image_key is None else np.asarray(d[self.image_key])[0]
        for key in self.key_iterator(d):
            lab = d[key]
            mapped = to_maisi_label(np.asarray(lab)[0], self.lut, ct)[None]
            d[key] = lab.clone().copy_(torch.as_tensor(mapped)) if torch.is_tensor(lab) else mapped
        return d


class FilterLabelsd(MapTransform):
    """Keep only the listed label ids (others -> 0, or -> body when ``keep_body``); ``None`` keeps everything."""

    def __init__(self, keys: KeysCollection, label_ids: Sequence[int] | None, keep_body: bool = True) -> None:
        super().__init__(keys)
        self.label_ids = None if label_ids is None else [int(i) for i in label_ids]
        self.keep_body = keep_body

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_ids is None:
            return d
        for key in self.key_iterator(d):
            lab = d[key]
            keep = torch.isin(torch.as_tensor(lab), torch.tensor(self.label_ids, dtype=torch.as_tensor(lab).dtype))
            filler = BODY_LABEL if self.keep_body else 0
            d[key] = torch.where(keep | (torch.as_tensor(lab) == 0), lab, torch.full_like(torch.as_tensor(lab), filler))
        return d


class CropAroundLabelsd(MapTransform):
    """Crop/pad a label map to ``spatial_size`` centred on the listed labels (the volume centre when none).

    A mask resampled to a smaller field of view keeps the requested anatomy instead of an arbitrary centre
    crop (the official retrieval rejects masks whose target labels do not survive). A mask already of
    ``spatial_size`` is returned unchanged, affine included. Padding is 0 (outside the body).
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], label_ids: Sequence[int] | None = None) -> None:
        super().__init__(keys)
        self.spatial_size = [int(s) for s in spatial_size]
        self.label_ids = [int(i) for i in (label_ids or [])]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import ResizeWithPadOrCrop, SpatialCrop

        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            if list(lab.shape[1:]) == self.spatial_size:
                continue
            hit = torch.isin(torch.as_tensor(lab[0]), torch.tensor(self.label_ids, dtype=torch.as_tensor(lab).dtype)) if self.label_ids else None
            if hit is not None and bool(hit.any()):
                idx = torch.nonzero(hit)
                centre = ((idx.min(0).values + idx.max(0).values) // 2).tolist()
                lab = SpatialCrop(roi_center=centre, roi_size=self.spatial_size)(lab)
            d[key] = ResizeWithPadOrCrop(self.spatial_size, mode="constant")(lab)
        return d
