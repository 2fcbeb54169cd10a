"""MAISI label space, label-to-condition encoding, CT intensity mapping and the organ-intensity quality check.

Sources: MAISI label dictionary (``label_dict.json`` of the MONAI model zoo ``maisi_ct_generative`` /
NV-Generate-CTMR; 132 ids + body 200), ``binarize_labels`` and the HU mapping of the official sampler, the
quality-check table ``image_median_statistics.json`` (MONAI tutorials ``generation/maisi/configs``).
The TotalSegmentator -> MAISI map is name-based (ours): TotalSegmentator v2 names (``kidney_left``,
``rib_left_1``, ``vertebrae_L5``) are rewritten to MAISI names (``left kidney``, ``left rib 1``,
``vertebrae L5``); structures MAISI does not list map to 0.
:func:`post_process_generated_mask` cleans masks from the mask-generation model (official
``general_mask_generation_post_process``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
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
    "GENERATED_TUMOR_HOSTS",
    "GENERATED_ORGANS",
    "GENERATED_SPINE",
    "GENERATED_INTESTINE",
    "largest_component",
    "dilate_mask",
    "close_mask",
    "post_process_generated_mask",
    "DUMMY_LABELS",
    "ORGAN_MAX_VOLUME_ML",
    "LABEL_FORMATS",
    "maisi_label_problems",
    "looks_like_totalsegmentator",
    "body_from_labels",
    "totalsegmentator_mask_to_maisi",
    "MaisiUserMaskd",
    "REGION_LABELS",
    "body_region_from_mask",
    "AugmentMaskd",
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


# --- post-processing of generated masks -------------------------------------------------------------------------
# Facts from the official MAISI code (``general_mask_generation_post_process`` in ``scripts/utils.py`` of
# NVIDIA-Medtech/NV-Generate-CTMR, same in Project-MONAI/tutorials generation/maisi and the model-zoo bundle
# ``maisi_ct_generative``); the implementation here is ours (vectorised, cropped to bounding boxes, CPU).

#: tumour label -> label it becomes when that tumour was not requested (lung tumour -> left lung upper lobe,
#: pancreatic tumour -> pancreas, hepatic tumour -> liver, colon cancer primaries -> colon, bone lesion -> body)
GENERATED_TUMOR_HOSTS: dict[int, int] = {23: 28, 24: 4, 26: 1, 27: 62, 128: BODY_LABEL}
#: organs reduced to their largest connected component and then closed, in the official order (liver,
#: pancreas, gallbladder, stomach, spleen, 5 lung lobes, kidneys, duodenum, aorta, IVC, adrenal glands;
#: the official list names the gallbladder (10) twice, so it is closed twice)
GENERATED_ORGANS: tuple[int, ...] = (1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9, 10)
#: vertebrae L5..C1, trachea and iliac arteries: treated like the organs unless a bone lesion is requested
GENERATED_SPINE: tuple[int, ...] = tuple(range(33, 60))
#: stomach, duodenum, small bowel, colon: one connected intestinal tract
GENERATED_INTESTINE: tuple[int, ...] = (12, 13, 19, 62)
_LUNG_LOBES = (28, 29, 30, 31, 32)
_CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity and the 3x3x3 morphology kernel of the official code


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the volume); ``None`` when empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (all False when the mask is empty)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    box = _bbox(mask, 0)
    if box is None:
        return out
    lab, n = ndimage.label(mask[box], structure=_CUBE)
    if n <= 1:
        out[box] = lab > 0
        return out
    sizes = np.bincount(lab.reshape(-1))[1:]
    out[box] = lab == int(np.argmax(sizes)) + 1
    return out


def dilate_mask(mask: np.ndarray, times: int = 1) -> np.ndarray:
    """Binary dilation with a 3x3x3 cube, ``times`` times (zero padding)."""
    return ndimage.binary_dilation(np.asarray(mask, dtype=bool), structure=_CUBE, iterations=int(times))


def close_mask(mask: np.ndarray, times: int = 2) -> np.ndarray:
    """``times`` rounds of (dilate, erode) with a 3x3x3 cube, zero padding for both (official ``organ_fill_by_closing``).

    Computed on the bounding box grown by ``times + 1`` voxels, which gives exactly the whole-volume result.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    box = _bbox(mask, int(times) + 1)
    if box is None:
        return out
    sub = mask[box]
    for _ in range(int(times)):
        sub = ndimage.binary_dilation(sub, structure=_CUBE)
        sub = ndimage.binary_erosion(sub, structure=_CUBE, border_value=0)
    out[box] = sub
    return out


def _keep_largest(label: np.ndarray, ids: Sequence[int], fill: int) -> np.ndarray:
    """Set every voxel of each label in ``ids`` outside that label's largest component to ``fill``."""
    out = label.copy()
    for i in dict.fromkeys(int(i) for i in ids):
        m = label == i
        out[m & ~largest_component(m)] = fill
    return out


def _grow_into(label: np.ndarray, target: int, region: np.ndarray) -> np.ndarray:
    """Voxels of ``region`` within three dilations of ``target`` (official ``organ_fill_by_removed_mask``)."""
    return dilate_mask(label == target, times=3) & np.asarray(region, dtype=bool)


def post_process_generated_mask(label: np.ndarray, target_tumor_label: int | None = None) -> np.ndarray:
    """Clean a mask decoded by the mask-generation VAE (MAISI ids, body 200), as the official pipeline does.

    Steps (official ``general_mask_generation_post_process``):

    1. body: foreground (> 0) eroded once, largest component, dilated once; everything outside becomes 0.
    2. tumours: tumours other than ``target_tumor_label`` become their host (:data:`GENERATED_TUMOR_HOSTS`);
       the requested tumour is closed (2 rounds) twice and, except hepatic tumour and bone lesion, reduced to
       its largest component (the rest -> body).
    3. organs (:data:`GENERATED_ORGANS`, plus :data:`GENERATED_SPINE` unless a bone lesion is requested): only
       the largest component survives (the rest -> body); small bowel and colon outside the largest connected
       intestinal tract (:data:`GENERATED_INTESTINE`) -> body; then every organ is closed (2 rounds).
    4. tumour-specific refilling: lung tumour (the lung lobe that surrounds it regrows into the removed ring,
       the tumour regrows into removed organ voxels next to it, lobes closed 3 times), hepatic tumour (liver
       regrows into removed intestine, spleen into removed organ voxels, tumour into removed organ voxels
       nearby, liver/hepatic vessel/tumour complex reduced to its largest component, liver closed 3 times),
       colon cancer primaries (tumour regrows into removed organ voxels nearby).
    5. hepatic vessel (25) of the decoded mask becomes liver (the size model does not control it), the
       decoded airway (132) is restored, and the requested tumour voxels of step 2 are restored.

    Deviation (ours): in step 4 the official code selects the liver/vessel/tumour complex with
    ``(liver) + (vessel) + (tumour) > 1``, which is never true for one label per voxel, so there the step
    removes nothing and the hepatic tumour is not restored in step 5; we use ``> 0`` (the evident intent).

    Args:
        label: decoded label map (X, Y, Z), MAISI ids after the 124 -> 132 remap.
        target_tumor_label: the requested tumour (23, 24, 26, 27 or 128) or ``None``.

    Returns:
        uint8 label map of the same shape.
    """
    vol = np.asarray(label).astype(np.int32)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D label map (X, Y, Z), got shape {vol.shape}")
    tumor = None if target_tumor_label is None else int(target_tumor_label)
    if tumor is not None and tumor not in GENERATED_TUMOR_HOSTS:
        raise ValueError(f"target_tumor_label must be one of {sorted(GENERATED_TUMOR_HOSTS)} or None, got {tumor}")
    hepatic_vessel, airway = vol == 25, vol == 132

    # 1. body
    body = ndimage.binary_erosion(vol > 0, structure=_CUBE, border_value=0)
    body = dilate_mask(largest_component(body))
    vol = vol * body

    # 2. tumours
    for t, host in GENERATED_TUMOR_HOSTS.items():
        if t != tumor:
            vol[vol == t] = host
        else:
            for _ in range(2):
                vol[close_mask(vol == t)] = t
    if tumor is not None and tumor not in (26, 128):
        vol = _keep_largest(vol, [tumor], BODY_LABEL)
    tumor_mask = (vol == tumor) if tumor is not None else np.zeros(vol.shape, dtype=bool)

    # 3. organs
    organs = GENERATED_ORGANS + (GENERATED_SPINE if tumor != 128 else ())
    data = _keep_largest(vol, organs, BODY_LABEL)
    organ_removed = data != vol
    tract = largest_component(np.isin(data, GENERATED_INTESTINE))
    intestine_removed = np.isin(data, (19, 62)) & ~tract
    data[intestine_removed] = BODY_LABEL
    for organ in organs:
        data[close_mask(data == organ)] = organ

    # 4. tumour-specific refilling
    if tumor == 23 and tumor_mask.any():
        ring = dilate_mask(data == 23)
        around = data[ring & (data != 23) & (data != 0)]
        if around.size:
            values, counts = np.unique(around, return_counts=True)
            lobe = int(values[np.argmax(counts)])  # most frequent neighbour (smallest id on ties)
            if lobe in _LUNG_LOBES:
                ring = dilate_mask(ring)
                data[_grow_into(data, lobe, ring & (data != 23))] = lobe
        ring = dilate_mask(ring)
        data[_grow_into(data, 23, ring & organ_removed)] = 23
        for lobe in _LUNG_LOBES:
            for _ in range(3):
                data[close_mask(data == lobe)] = lobe
    if tumor == 26 and tumor_mask.any():
        for _ in range(2):
            data[_grow_into(data, 1, intestine_removed)] = 1
        for _ in range(2):
            data[_grow_into(data, 3, organ_removed)] = 3
        data[_grow_into(data, 26, dilate_mask(data == 26, times=2) & organ_removed)] = 26
        complex_ = np.isin(data, (1, 25, 26))
        kept = largest_component(complex_)
        data[complex_ & ~kept] = BODY_LABEL
        tumor_mask &= kept
        for _ in range(3):
            data[close_mask(data == 1)] = 1
    if tumor == 27 and tumor_mask.any():
        data[_grow_into(data, 27, dilate_mask(data == 27, times=2) & organ_removed)] = 27

    # 5. restore
    data[hepatic_vessel] = 1
    data[airway] = 132
    if tumor is not None:
        data[tumor_mask] = tumor
    return data.astype(np.uint8)


# --- user masks: MAISI label semantics, TotalSegmentator conversion ------------------------------------------------

#: ids named ``dummy1`` .. ``dummy8`` in the MAISI label dictionary: never produced by the MAISI mask pipeline
DUMMY_LABELS: tuple[int, ...] = tuple(sorted(v for k, v in MAISI_LABELS.items() if k.startswith("dummy")))
#: upper bounds (ml) of a whole organ in an adult CT (ours: several times the typical volume); a mask beyond
#: them is not in MAISI ids or has a wrong voxel size. Lower bounds are not checked: the field of view may cut
#: an organ.
ORGAN_MAX_VOLUME_ML: dict[str, float] = {
    "liver": 6000.0, "spleen": 2500.0, "pancreas": 600.0, "right kidney": 1000.0, "left kidney": 1000.0,
    "gallbladder": 500.0, "heart": 2500.0, "brain": 3000.0, "bladder": 2000.0, "aorta": 1500.0,
}
LABEL_FORMATS = ("maisi", "totalsegmentator")


def _ids_text(ids: Sequence[int], counts: Mapping[int, int] | None = None) -> str:
    names = {v: k for k, v in MAISI_LABELS.items()}
    parts = []
    for i in ids:
        part = f"{i} ({names.get(i, '?')}"
        if counts is not None:
            part += f", {counts[i]} voxels"
        parts.append(part + ")")
    return ", ".join(parts)


def maisi_label_problems(label: np.ndarray, spacing: Sequence[float]) -> list[str]:
    """What makes ``label`` (X, Y, Z) not a MAISI label map: no body label 200, ``dummy*`` ids, organs larger than
    :data:`ORGAN_MAX_VOLUME_ML` at voxel size ``spacing`` (mm). Empty list = plausible."""
    lab = np.asarray(label)
    values, counts = np.unique(lab, return_counts=True)
    count = {int(v): int(c) for v, c in zip(values, counts)}
    problems = []
    if BODY_LABEL not in count:
        problems.append(f"no body label {BODY_LABEL} (MAISI labels every body voxel outside the listed structures "
                        f"{BODY_LABEL}; without it the whole background becomes air)")
    dummies = [i for i in DUMMY_LABELS if i in count]
    if dummies:
        problems.append(f"ids the MAISI label dictionary leaves unused: {_ids_text(dummies, count)}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    big = []
    for name, limit in ORGAN_MAX_VOLUME_ML.items():
        ml = count.get(MAISI_LABELS[name], 0) * voxel_ml
        if ml > limit:
            big.append(f"{MAISI_LABELS[name]} ({name}) {ml:.0f} ml > {limit:.0f} ml")
    if big:
        problems.append("implausible organ volumes at this voxel size: " + ", ".join(big))
    return problems


def looks_like_totalsegmentator(label: np.ndarray, class_map: Mapping[int, str]) -> bool:
    """A TotalSegmentator ``total`` map has no 200 and only ids of its class map (1..117 in v2)."""
    ids = {int(v) for v in np.unique(np.asarray(label)) if v}
    return bool(ids) and BODY_LABEL not in ids and ids <= {int(k) for k in class_map}


def body_from_labels(label: np.ndarray, spacing: Sequence[float], closing_mm: float = 15.0) -> np.ndarray:
    """An approximate body region from a label map without one (ours): the labelled structures, closed with a
    ``closing_mm`` cube and filled slice by slice along the axial axis. Skin and subcutaneous fat
    outside the outermost labelled structures are missed."""
    fg = np.asarray(label) > 0
    if not fg.any():
        return fg
    r = max(1, int(round(closing_mm / max(float(s) for s in spacing))))  # r 3x3x3 steps = a (2r+1)^3 cube
    padded = np.pad(fg, r)
    closed = ndimage.binary_closing(padded, structure=_CUBE, iterations=r)
    body = closed[tuple(slice(r, r + n) for n in fg.shape)] | fg
    for z in range(body.shape[-1]):
        body[..., z] = ndimage.binary_fill_holes(body[..., z])
    return body


def totalsegmentator_mask_to_maisi(label: np.ndarray, class_map: Mapping[int, str], spacing: Sequence[float]) -> np.ndarray:
    """TotalSegmentator ``total`` label map -> MAISI ids by name (:func:`totalsegmentator_to_maisi_lut`, the map the
    bundle uses for training labels); structures MAISI does not list and the approximate body
    (:func:`body_from_labels`) become body 200."""
    lab = np.asarray(label).astype(np.int64)
    out = to_maisi_label(lab, totalsegmentator_to_maisi_lut(class_map))
    out[(out == 0) & body_from_labels(lab, spacing)] = BODY_LABEL
    return out


class MaisiUserMaskd(MapTransform):
    """Check (and convert) a user's label mask before generation; channel-first (1, X, Y, Z) MetaTensor in.

    ``label_format="maisi"``: the mask must have MAISI semantics (:func:`maisi_label_problems`), otherwise one
    ``InvalidInputError`` names the file, the offending ids and, when the content looks like a TotalSegmentator
    map, the ``label_format`` option. ``"totalsegmentator"``: every id must be a TotalSegmentator ``total`` id
    (``class_map``); the map is converted by name (:func:`totalsegmentator_mask_to_maisi`).
    """

    def __init__(self, keys: KeysCollection, label_format: str = "maisi", class_map: Mapping[int, str] | None = None,
                 enabled: bool = True, key_name: str = "label_path") -> None:
        super().__init__(keys)
        from common.utils.errors import InvalidInputError

        if label_format not in LABEL_FORMATS:
            raise InvalidInputError(f"config key 'label_format' is {label_format!r}; expected one of {LABEL_FORMATS}")
        self.label_format = label_format
        self.class_map = {int(k): str(v) for k, v in (class_map or {}).items()}
        self.enabled = bool(enabled)
        self.key_name = key_name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from common.utils.errors import InvalidInputError

        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            lab = d[key]
            arr = np.asarray(lab[0])
            meta = getattr(lab, "meta", {}) or {}
            source = meta.get("filename_or_obj", "the mask")
            affine = np.asarray(getattr(lab, "affine", np.eye(4)))
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            if self.label_format == "totalsegmentator":
                ids = sorted(int(v) for v in np.unique(arr) if v)
                unknown = [i for i in ids if i not in self.class_map]
                if unknown:
                    raise InvalidInputError(
                        f"label mask '{source}' (config key '{self.key_name}', label_format 'totalsegmentator') has "
                        f"ids {unknown} that are not TotalSegmentator 'total' classes (1..{max(self.class_map)}); "
                        "is it a MAISI mask (label_format 'maisi') or another segmenter's?"
                    )
                mapped = totalsegmentator_mask_to_maisi(arr, self.class_map, spacing)
                d[key] = lab.clone().copy_(torch.as_tensor(mapped[None]).to(lab.dtype)) if torch.is_tensor(lab) else mapped[None]
                continue
            problems = maisi_label_problems(arr, spacing)
            if problems:
                hint = ""
                if self.class_map and looks_like_totalsegmentator(arr, self.class_map):
                    hint = ("; its ids are all TotalSegmentator 'total' classes: if it is a TotalSegmentator map, set "
                            "label_format to 'totalsegmentator' to convert it by name")
                raise InvalidInputError(
                    f"label mask '{source}' (config key '{self.key_name}') is not a MAISI label map: "
                    + "; ".join(problems) + hint
                )
        return d


# --- body region and mask augmentation ---------------------------------------------------------------------------

#: labels that mark each body region (official ``get_body_region_index_from_mask``): head (brain, skull), thorax
#: (lung lobes), abdomen (liver, dummy1, spleen, pancreas, kidneys), pelvis/lower (femurs)
REGION_LABELS: tuple[tuple[int, ...], ...] = ((22, 120), (28, 29, 30, 31, 32), (1, 2, 3, 4, 5, 14), (93, 94))


def body_region_from_mask(label: np.ndarray | torch.Tensor) -> tuple[list[int], list[int]] | None:
    """One-hot top and bottom body region (order head, thorax, abdomen, pelvis) of a MAISI mask: the first and
    the last region whose marker labels are present; ``None`` when none is."""
    present = set(np.unique(torch.as_tensor(label).cpu().numpy()).astype(int).tolist())
    hits = [i for i, ids in enumerate(REGION_LABELS) if present & set(ids)]
    if not hits:
        return None
    eye = np.eye(len(REGION_LABELS), dtype=int)
    return eye[min(hits)].tolist(), eye[max(hits)].tolist()


# tumour -> (host labels, label its voxels get before the move, affine ranges (translate vox, rotate rad, scale),
# fraction of its volume that must land in the host); official ``augmentation.py`` (facts; Rand3DElastic there,
# an affine move here (ours))
_TUMOR_AUG: dict[int, tuple[tuple[int, ...], int | None, tuple, float]] = {
    128: (tuple(range(33, 57)) + tuple(range(63, 98)) + (127, 114), BODY_LABEL, ((5, 5, 0), (0, 0, 0.1), (0.15, 0.15, 0)), 0.8),
    26: ((1,), 1, ((10, 10, 10), (np.pi / 36,) * 3, (0.2, 0.2, 0.2)), 0.8),
    23: ((28, 29, 30, 31, 32), None, ((20, 20, 20), (np.pi / 36, np.pi / 36, np.pi), (0.15, 0.15, 0.15)), 0.85),
    24: ((4,), 4, ((15, 15, 15), (np.pi / 36,) * 3, (0.1, 0.1, 0.1)), 0.8),
    27: ((62,), 62, ((5, 5, 5), (np.pi / 36,) * 3, (0.1, 0.1, 0.1)), 0.8),
}


class AugmentMaskd(MapTransform, Randomizable):
    """Augment a retrieved mask (1, X, Y, Z) before generation, as the official sampler does for database masks.

    Facts from the official ``augmentation`` (MONAI tutorials / NV-Generate-CTMR ``scripts/augmentation.py``): a
    mask with a tumour (priority bone lesion, hepatic, lung, pancreatic, colon) has the tumour moved at random
    inside its host organ (its old place filled with the host) until at least 80 % (lung 85 %) of it lands in the
    closed host region, then closed; a mask without a tumour is zoomed by a random factor in [0.99, 1.01]
    (nearest neighbour, same size). Ours: an affine move (the official uses an elastic one for four tumours) and at
    most ``max_tries`` moves (then the tumour stays where it was). Applied only when the item's ``augment_key``
    is true.
    """

    def __init__(self, keys: KeysCollection, seed: int = 0, augment_key: str = "augment", max_tries: int = 50) -> None:
        MapTransform.__init__(self, keys)
        self.augment_key = augment_key
        self.max_tries = int(max_tries)
        self.set_random_state(seed=int(seed))

    def randomize(self, data: Any = None) -> int:
        return int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not d.get(self.augment_key):
            return d
        for key in self.key_iterator(d):
            lab = d[key]
            out = self.augment(torch.as_tensor(lab).clone(), self.randomize())
            d[key] = lab.clone().copy_(out) if isinstance(lab, torch.Tensor) else out.numpy()
        return d

    def augment(self, label: torch.Tensor, seed: int) -> torch.Tensor:
        from monai.transforms import RandAffine, RandZoom

        vol = label[0].clone()
        present = set(torch.unique(vol).tolist())
        tumor = next((t for t in (128, 26, 23, 24, 27) if t in present), None)
        if tumor is None:
            zoom = RandZoom(min_zoom=0.99, max_zoom=1.01, mode="nearest", prob=1.0, keep_size=True)
            zoom.set_random_state(seed=seed)
            return torch.as_tensor(zoom(label)).to(label.dtype)
        hosts, fill, (translate, rotate, scale), need = _TUMOR_AUG[tumor]
        t_mask = vol == tumor
        if fill is None:  # lung tumour: the most frequent lobe around it
            ring = torch.as_tensor(dilate_mask(t_mask.numpy(), 1)) & ~t_mask & torch.isin(vol, torch.tensor(hosts, dtype=vol.dtype))
            fill = int(torch.mode(vol[ring]).values) if ring.any() else hosts[0]
        vol[t_mask] = fill
        host = close_mask(torch.isin(vol, torch.tensor(hosts, dtype=vol.dtype)).numpy() | t_mask.numpy(), times=2)
        size = int(t_mask.sum())
        move = RandAffine(prob=1.0, translate_range=translate, rotate_range=rotate, scale_range=scale,
                          mode="nearest", padding_mode="zeros")
        move.set_random_state(seed=seed)
        placed = t_mask.numpy()
        for _ in range(self.max_tries):
            moved = np.asarray(move(t_mask[None].float()))[0] > 0.5
            inside = moved & host
            if inside.sum() >= need * size:
                placed = close_mask(inside, times=2) & host
                break
        vol[torch.as_tensor(placed)] = tumor
        return vol[None].to(label.dtype)
