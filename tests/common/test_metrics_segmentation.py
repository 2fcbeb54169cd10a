"""Segmentation metrics: MONAI agreement on real TotalSegmentator labels and the diffseg spec's properties."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage

from common.data.fetch import demo_file
from common.metrics import (
    centroid_distance,
    dice,
    hd95,
    iou,
    mean_surface_distance,
    nsd,
    segmentation_metrics,
    summarise,
)

# organs of the 61-class example (liver, spleen, kidneys, stomach, aorta, ribs ...), large and small
CLASSES = (1, 2, 5, 7, 18, 20, 52, 98)
REMOVED = 33  # present in the ground truth, deleted from the prediction
ABSENT = 12  # present in neither


@pytest.fixture(scope="module")
def labels() -> dict:
    img = nib.load(demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz"))
    gt = np.asarray(img.dataobj).astype(np.int64)
    assert np.any(gt == REMOVED) and not np.any(gt == ABSENT)
    # prediction: shifted by one voxel, some organs eroded or dilated, one organ deleted
    pred = np.roll(gt, shift=(1, 0, -1), axis=(0, 1, 2))
    for c in (2, 18):
        organ = pred == c
        pred[organ & ~ndimage.binary_erosion(organ)] = 0
    pred[ndimage.binary_dilation(pred == 5) & (pred == 0)] = 5
    pred[pred == REMOVED] = 0
    return {"gt": gt, "pred": pred, "spacing": tuple(float(z) for z in img.header.get_zooms()[:3])}


def _onehot(lab: np.ndarray, classes) -> torch.Tensor:
    return torch.stack([torch.from_numpy(lab == c) for c in classes])[None].float()  # (1, C, H, W, D)


def test_matches_monai_on_real_labels(labels):
    gt, pred, sp = labels["gt"], labels["pred"], labels["spacing"]
    assert sp == (3.0, 3.0, 3.0)
    p1h, g1h = _onehot(pred, CLASSES), _onehot(gt, CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_dice = compute_dice(p1h, g1h, include_background=True)[0]
        ref_hd = compute_hausdorff_distance(p1h, g1h, include_background=True, percentile=95, spacing=sp)[0]
        ref_nsd = compute_surface_dice(p1h, g1h, [3.0] * len(CLASSES), include_background=True, spacing=sp)[0]
        ref_msd = compute_average_surface_distance(p1h, g1h, include_background=True, symmetric=True, spacing=sp)[0]
    rows = {r["class"]: r for r in segmentation_metrics(pred, gt, num_classes=99, spacing=sp, nsd_tolerance=3.0)}
    for i, c in enumerate(CLASSES):
        pc, gc = pred == c, gt == c
        assert dice(pc, gc) == pytest.approx(float(ref_dice[i]), abs=1e-4)
        assert hd95(pc, gc, sp) == pytest.approx(float(ref_hd[i]), abs=1e-4)
        assert nsd(pc, gc, sp, tolerance=3.0) == pytest.approx(float(ref_nsd[i]), abs=1e-4)
        assert mean_surface_distance(pc, gc, sp) == pytest.approx(float(ref_msd[i]), abs=1e-4)
        assert rows[c]["dice"] == pytest.approx(float(ref_dice[i]), abs=1e-4)
        assert rows[c]["hd95"] == pytest.approx(float(ref_hd[i]), abs=1e-4)
        assert rows[c]["nsd"] == pytest.approx(float(ref_nsd[i]), abs=1e-4)
        assert rows[c]["msd"] == pytest.approx(float(ref_msd[i]), abs=1e-4)
        assert rows[c]["iou"] == pytest.approx(np.sum(pc & gc) / np.sum(pc | gc))
    # the perturbations are visible: 1-voxel shift everywhere, eroded organs score lower
    assert all(0.2 < rows[c]["dice"] < 1.0 for c in CLASSES)
    assert rows[2]["dice"] < dice(np.roll(gt, (1, 0, -1), (0, 1, 2)) == 2, gt == 2)
    # the shift (3, 0, -3) mm moves every centroid of an unmodified organ by 3 * sqrt(2) mm
    assert rows[1]["cd"] == pytest.approx(3 * math.sqrt(2), abs=1e-6)


def test_anisotropic_spacing_and_tensor_input(labels):
    gt, pred = labels["gt"], labels["pred"]
    sp = (0.8, 1.5, 3.0)
    p, g = pred == 5, gt == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = compute_hausdorff_distance(_onehot(pred, [5]), _onehot(gt, [5]), True, percentile=95, spacing=sp)
        ref_nsd = compute_surface_dice(_onehot(pred, [5]), _onehot(gt, [5]), [2.0], True, spacing=sp)
    assert hd95(torch.from_numpy(p), torch.from_numpy(g), sp) == pytest.approx(float(ref), abs=1e-4)
    assert nsd(p, g, sp, 2.0) == pytest.approx(float(ref_nsd), abs=1e-4)
    assert hd95(p, g, sp) != pytest.approx(hd95(p, g, 1.0), abs=1e-3)
    ref_cd = np.linalg.norm((np.argwhere(p).mean(0) - np.argwhere(g).mean(0)) * np.array(sp))
    assert centroid_distance(p, g, sp) == pytest.approx(ref_cd, rel=1e-12)
    # label maps with a leading channel and as tensors give the same rows
    rows_a = segmentation_metrics(pred, gt, 8, sp)
    rows_b = segmentation_metrics(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None], 8, sp)
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k]


def test_empty_mask_conventions(labels):
    gt, pred = labels["gt"], labels["pred"]
    rows = {r["class"]: r for r in segmentation_metrics(pred, gt, num_classes=40, spacing=3.0)}
    # both empty: NaN everywhere (MONAI's compute_dice(ignore_empty=False) would give 1)
    assert all(math.isnan(rows[ABSENT][k]) for k in ("dice", "iou", "hd95", "nsd", "msd", "cd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = torch.zeros(1, 1, 4, 4, 4)
        assert float(compute_dice(z, z, include_background=True, ignore_empty=False)) == 1.0
    # only the ground truth present: Dice/IoU 0, distances NaN
    assert rows[REMOVED]["dice"] == 0.0 and rows[REMOVED]["iou"] == 0.0
    assert all(math.isnan(rows[REMOVED][k]) for k in ("hd95", "nsd", "msd", "cd"))
    a = np.zeros((6, 6, 6), bool)
    a[2:4, 2:4, 2:4] = True
    e = np.zeros_like(a)
    assert math.isnan(dice(e, e)) and dice(a, e) == 0.0 and dice(e, a) == 0.0
    assert math.isnan(hd95(a, e)) and math.isnan(nsd(e, a)) and math.isnan(centroid_distance(a, e))
    assert [r["class"] for r in segmentation_metrics(a.astype(int), a.astype(int), 2, 1.0)] == [1]
    rows_bg = segmentation_metrics(a.astype(int), a.astype(int), 2, 1.0, include_background=True)
    assert [r["class"] for r in rows_bg] == [0, 1]


def test_identical_masks():
    a = np.zeros((20, 18, 16), bool)
    a[4:12, 5:15, 3:9] = True
    a[10:16, 2:6, 8:14] = True
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert hd95(a, a) == 0.0 and nsd(a, a) == 1.0 and mean_surface_distance(a, a) == 0.0
    assert centroid_distance(a, a, (1.0, 2.0, 3.0)) == 0.0


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_cube_shifted_by_two_voxels(spacing):
    gt = np.zeros((24, 24, 24), bool)
    gt[6:14, 6:14, 6:14] = True
    pred = np.roll(gt, 2, axis=1)
    assert centroid_distance(pred, gt, spacing) == pytest.approx(2.0 * spacing, abs=1e-12)
    assert hd95(pred, gt, spacing, percentile=100) == pytest.approx(2.0 * spacing, abs=1e-6)  # maximum distance
    h = hd95(pred, gt, spacing)
    assert 0 < h <= 2.0 * spacing + 1e-6
    assert dice(pred, gt) == pytest.approx(2 * 6 / 16)  # overlap 8x6x8 of two 8^3 cubes
    # every distance doubles with the spacing
    assert h == pytest.approx(2.0 * hd95(pred, gt, 1.0) if spacing == 2.0 else h)
    assert mean_surface_distance(pred, gt, spacing) == pytest.approx(spacing * mean_surface_distance(pred, gt, 1.0))
    # NSD: at a tolerance of the shift every boundary voxel is within reach, below it not all are
    assert nsd(pred, gt, spacing, tolerance=2.0 * spacing) == 1.0
    assert 0 < nsd(pred, gt, spacing, tolerance=0.5 * spacing) < 1.0


def test_summarise_hand_computed():
    nan = float("nan")
    rows = [
        {"case": "a", "class": 0, "dice": 0.99, "hd95": 1.0},
        {"case": "a", "class": 1, "dice": 0.8, "hd95": 2.0},
        {"case": "a", "class": 2, "dice": nan, "hd95": nan},
        {"case": "b", "class": 0, "dice": 0.97, "hd95": 1.0},
        {"case": "b", "class": 1, "dice": 0.6, "hd95": 4.0},
        {"case": "b", "class": 2, "dice": 0.4, "hd95": 8.0},
    ]
    out = {r["class"]: r for r in summarise(rows, metrics=("dice", "hd95", "nsd"))}
    assert "nsd_mean" not in out[1]  # metrics absent from the rows are skipped
    assert out[1]["dice_mean"] == pytest.approx(0.7) and out[1]["dice_std"] == pytest.approx(0.1)
    assert out[1]["dice_nan"] == 0 and out[1]["n"] == 2
    assert out[2]["dice_mean"] == pytest.approx(0.4) and out[2]["dice_std"] == 0.0 and out[2]["dice_nan"] == 1
    # case scores (classes >= 1, NaN-mean): a = 0.8, b = 0.5; background excluded
    assert out["overall"]["dice_mean"] == pytest.approx(0.65)
    assert out["overall"]["dice_std"] == pytest.approx(0.15)
    assert out["overall"]["hd95_mean"] == pytest.approx((2.0 + 6.0) / 2)
    assert out["overall"]["n"] == 2 and out["overall"]["dice_nan"] == 0
    # a case whose classes are all NaN counts as a NaN case
    rows.append({"case": "c", "class": 1, "dice": nan, "hd95": nan})
    over = summarise(rows, metrics=("dice",))[-1]
    assert over["dice_nan"] == 1 and over["dice_mean"] == pytest.approx(0.65)
