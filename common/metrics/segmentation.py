"""Per-class segmentation metrics with explicit empty-mask conventions (``diffseg`` spec §6).

Binary-mask functions (:func:`dice`, :func:`iou`, :func:`hd95`, :func:`nsd`,
:func:`mean_surface_distance`, :func:`centroid_distance`) take two masks of the same spatial shape
``(H, W)`` or ``(H, W, D)`` (NumPy arrays or PyTorch tensors; non-zero = foreground) and return a
Python ``float``. Distances are in physical units (mm) given the voxel ``spacing`` (one number for
isotropic voxels or one per spatial axis, in the array's axis order).

Conventions:

* **Dice** ``2|P ∩ G| / (|P| + |G|)``: NaN iff both masks are empty, 0 if exactly one is empty.
  (MONAI ``compute_dice(ignore_empty=False)`` returns 1 for two empty masks, and
  ``ignore_empty=True`` returns NaN whenever the ground truth is empty.) IoU likewise.
* **Surface distances** follow MONAI ``get_edge_surface_distance`` (``use_subvoxels=False``): the
  edge of a mask is ``mask XOR binary_erosion(mask)`` (6-connected structuring element in 3D,
  computed in the bounding box of ``P ∪ G`` padded by one voxel, outside counts as background);
  ``d_PG`` are the Euclidean distances (with spacing) from each edge voxel of P to the nearest edge
  voxel of G and ``d_GP`` vice versa. HD95, NSD and the mean surface distance are NaN if either
  mask is empty (MONAI returns inf/0/NaN depending on the function).
* **HD95** ``max(P95(d_PG), P95(d_GP))`` (``torch.quantile``, linear interpolation) =
  MONAI ``compute_hausdorff_distance(percentile=95, directed=False, spacing=...)``.
* **NSD** at tolerance ``tau`` ``(#{d_PG <= tau} + #{d_GP <= tau}) / (|edge_P| + |edge_G|)`` =
  MONAI ``compute_surface_dice(class_thresholds=[tau], use_subvoxels=False)`` (Nikolov et al.,
  arXiv:1809.04430, with boundary voxels counted instead of surfel areas).
* **Mean surface distance** (average symmetric surface distance) ``mean(d_PG ∪ d_GP)`` =
  MONAI ``compute_average_surface_distance(symmetric=True)``.
* **Centroid distance** ``|| mean_{v in P} x_v - mean_{v in G} x_v ||`` with ``x_v = index * spacing``
  (for an axis-aligned affine this is the distance of the physical centroids).

:func:`segmentation_metrics` evaluates every class of two label maps of one case and
:func:`summarise` aggregates the per-class rows of many cases (case score = NaN-mean over the
classes ``>= 1``; dataset score = mean and standard deviation over cases).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from monai.metrics.utils import get_edge_surface_distance

__all__ = [
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
]

ArrayLike = np.ndarray | torch.Tensor
Spacing = float | Sequence[float]

#: Metric keys of the rows returned by :func:`segmentation_metrics`.
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "nsd", "msd", "cd")


def _binary(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) != 0


def _pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary(pred), _binary(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}.")
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D spatial arrays, got shape {p.shape}.")
    return p, g


def _spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).ravel()
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim:
        raise ValueError(f"spacing must have 1 or {ndim} values, got {s.size}.")
    return s


def dice(pred: ArrayLike, gt: ArrayLike) -> float:
    """Dice coefficient ``2|P ∩ G| / (|P| + |G|)``; NaN iff both are empty, 0 if one is empty."""
    p, g = _pair(pred, gt)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def iou(pred: ArrayLike, gt: ArrayLike) -> float:
    """Intersection over union ``|P ∩ G| / |P ∪ G|``; NaN iff both are empty, 0 if one is empty."""
    p, g = _pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(p, g).sum()) / union


def surface_distances(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Edge-to-edge distances ``(d_PG, d_GP)`` in mm, or ``None`` if either mask is empty.

    Computed with MONAI ``get_edge_surface_distance(symmetric=True, use_subvoxels=False)``
    (Euclidean metric, ``spacing`` per axis). ``d_PG`` has one entry per edge voxel of ``pred``.
    """
    p, g = _pair(pred, gt)
    if not p.any() or not g.any():
        return None
    sp = _spacing(spacing, p.ndim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty-mask and deprecation warnings of MONAI
        _, (d_pg, d_gp), _ = get_edge_surface_distance(
            torch.from_numpy(p), torch.from_numpy(g), distance_metric="euclidean", spacing=sp.tolist(), symmetric=True
        )
    return d_pg.double().cpu().numpy(), d_gp.double().cpu().numpy()


def _hd95_from(d: tuple[np.ndarray, np.ndarray], percentile: float = 95.0) -> float:
    # torch.quantile (linear interpolation) on float32 distances, exactly as MONAI does
    return float(max(torch.quantile(torch.as_tensor(x, dtype=torch.float32), percentile / 100.0) for x in d))


def _nsd_from(d: tuple[np.ndarray, np.ndarray], tolerance: float) -> float:
    d_pg, d_gp = d
    # MONAI compares float32 distances with the threshold
    n_ok = int(np.sum(d_pg.astype(np.float32) <= tolerance)) + int(np.sum(d_gp.astype(np.float32) <= tolerance))
    return n_ok / (d_pg.size + d_gp.size)


def _msd_from(d: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.concatenate(d).mean())


def hd95(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = 1.0, percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN if either mask is empty.

    ``max(P95(d_PG), P95(d_GP))`` (``percentile=100`` gives the Hausdorff distance).
    """
    d = surface_distances(pred, gt, spacing)
    return float("nan") if d is None else _hd95_from(d, percentile)


def nsd(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = 1.0, tolerance: float = 1.0) -> float:
    """Normalised surface Dice at ``tolerance`` mm (boundary voxels weighted equally); NaN if either is empty."""
    if tolerance < 0 or not np.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}.")
    d = surface_distances(pred, gt, spacing)
    return float("nan") if d is None else _nsd_from(d, tolerance)


def mean_surface_distance(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = 1.0) -> float:
    """Average symmetric surface distance ``mean(d_PG ∪ d_GP)`` in mm; NaN if either mask is empty."""
    d = surface_distances(pred, gt, spacing)
    return float("nan") if d is None else _msd_from(d)


def centroid_distance(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = 1.0) -> float:
    """Euclidean distance (mm) between the centroids of the two masks; NaN if either is empty.

    Voxel ``v`` with array index ``i_v`` sits at ``x_v = i_v * spacing``.
    """
    p, g = _pair(pred, gt)
    if not p.any() or not g.any():
        return float("nan")
    sp = _spacing(spacing, p.ndim)
    cp = np.argwhere(p).mean(axis=0) * sp
    cg = np.argwhere(g).mean(axis=0) * sp
    return float(np.linalg.norm(cp - cg))


def _labels(x: ArrayLike, ndim: int | None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1 and ndim in (None, 3):
        a = a[0]  # channel-first (1, H, W, D) label map
    elif ndim is not None and a.ndim == ndim + 1 and a.shape[0] == 1:
        a = a[0]
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(a == np.round(a)):
            raise ValueError("label maps must hold integer class indices (apply argmax first).")
    return a.astype(np.int64)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, c: int, shape: tuple[int, ...]):
    """Union of two ``find_objects`` boxes (the whole array for the background or two empty masks)."""
    if c == 0 or (a is None and b is None):
        return tuple(slice(0, s) for s in shape)
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def segmentation_metrics(
    pred_labels: ArrayLike,
    gt_labels: ArrayLike,
    num_classes: int,
    spacing: Spacing = 1.0,
    nsd_tolerance: float = 1.0,
    include_background: bool = False,
) -> list[dict[str, float | int]]:
    """All per-class metrics of one case.

    Args:
        pred_labels: predicted label map ``(H, W[, D])`` of class indices (a leading channel of
            size 1, ``(1, H, W, D)``, is removed).
        gt_labels: reference label map, same shape.
        num_classes: number of classes ``C`` including the background 0.
        spacing: voxel size in mm, one value or one per spatial axis.
        nsd_tolerance: NSD tolerance in mm.
        include_background: also return a row for class 0.

    Returns:
        one dict per class (``1 .. C-1``, plus 0 first if ``include_background``) with keys
        ``class`` and :data:`METRIC_NAMES` (``dice``, ``iou``, ``hd95``, ``nsd``, ``msd``, ``cd``);
        callers add e.g. a ``case`` key before :func:`summarise`.
    """
    ndim = None if np.ndim(spacing) == 0 else len(spacing)  # type: ignore[arg-type]
    p, g = _labels(pred_labels, ndim), _labels(gt_labels, ndim)
    if p.shape != g.shape:
        raise ValueError(f"pred_labels and gt_labels must have the same shape, got {p.shape} and {g.shape}.")
    if p.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got shape {p.shape}.")
    # bounding boxes per class; metrics are translation invariant and edges at a crop border count as
    # edges (erosion treats outside voxels as background), so cropping to the union box is exact
    boxes_p = ndimage.find_objects(np.clip(p, 0, None), max_label=num_classes)
    boxes_g = ndimage.find_objects(np.clip(g, 0, None), max_label=num_classes)
    rows: list[dict[str, float | int]] = []
    for c in range(0 if include_background else 1, num_classes):
        box = _union_box(boxes_p[c - 1] if c >= 1 else None, boxes_g[c - 1] if c >= 1 else None, c, p.shape)
        pc, gc = p[box] == c, g[box] == c
        d = surface_distances(pc, gc, spacing)
        nan = float("nan")
        rows.append(
            {
                "class": c,
                "dice": dice(pc, gc),
                "iou": iou(pc, gc),
                "hd95": nan if d is None else _hd95_from(d),
                "nsd": nan if d is None else _nsd_from(d, nsd_tolerance),
                "msd": nan if d is None else _msd_from(d),
                "cd": centroid_distance(pc, gc, spacing),
            }
        )
    return rows


def _stats(values: Iterable[float]) -> tuple[float, float, int, int]:
    v = np.asarray(list(values), dtype=np.float64)
    n_nan = int(np.isnan(v).sum())
    finite = v[~np.isnan(v)]
    if finite.size == 0:
        return float("nan"), float("nan"), n_nan, int(v.size)
    return float(finite.mean()), float(finite.std()), n_nan, int(v.size)


def summarise(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRIC_NAMES
) -> list[dict[str, float | int | str]]:
    """Aggregate per-(case, class) rows into per-class and overall statistics.

    Rows are dicts with keys ``class``, optionally ``case`` (rows without one form a single case)
    and the metric names. For every class the mean and standard deviation (population, ``ddof=0``)
    over the cases where the metric is not NaN, and the number of NaN values, are reported. The
    ``"overall"`` row uses the case scores: per case the NaN-mean over the classes ``>= 1`` (NaN if
    all are NaN), then mean/std/NaN count over cases (``diffseg`` spec §6).

    Args:
        rows: per-class rows, e.g. the concatenated outputs of :func:`segmentation_metrics`.
        metrics: metric keys to aggregate (those missing from the rows are ignored).

    Returns:
        one dict per class (sorted) and a final ``class="overall"`` dict, with keys ``class``,
        ``n`` (number of values) and ``<metric>_mean``, ``<metric>_std``, ``<metric>_nan``.
    """
    present = [m for m in metrics if any(m in r for r in rows)]
    classes = sorted({int(r["class"]) for r in rows})
    out: list[dict[str, float | int | str]] = []
    for c in classes:
        sel = [r for r in rows if int(r["class"]) == c]
        entry: dict[str, float | int | str] = {"class": c, "n": len(sel)}
        for m in present:
            mean, std, n_nan, _ = _stats(r.get(m, np.nan) for r in sel)
            entry.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_nan": n_nan})
        out.append(entry)
    cases: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        cases.setdefault(r.get("case"), []).append(r)
    overall: dict[str, float | int | str] = {"class": "overall", "n": len(cases)}
    for m in present:
        scores = []
        for case_rows in cases.values():
            v = np.asarray([r.get(m, np.nan) for r in case_rows if int(r["class"]) >= 1], dtype=np.float64)
            scores.append(float(v[~np.isnan(v)].mean()) if np.any(~np.isnan(v)) else float("nan"))
        mean, std, n_nan, _ = _stats(scores)
        overall.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_nan": n_nan})
    out.append(overall)
    return out
