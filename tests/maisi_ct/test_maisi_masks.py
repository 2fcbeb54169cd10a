"""Mask database: builder on the real example scan, retrieval ranking and tumour exclusion."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.demo import total_class_names
from common.data.fetch import demo_file
from common.data.maisi_masks import build_mask_db, find_masks, load_mask_db
from common.transforms.maisi import BODY_LABEL, MAISI_LABELS


def test_build_mask_db_from_example_scan(tmp_path):
    db = build_mask_db(tmp_path, demo_file("totalsegmentator/example_ct.nii.gz"),
                       demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz"), total_class_names())
    entries = load_mask_db(db)
    assert len(entries) == 3
    full = nib.load(entries[0]["pseudo_label_filename"])
    arr = np.asarray(full.dataobj)
    assert full.shape == (122, 101, 112) and full.get_data_dtype() == np.uint8
    assert entries[0]["dim"] == [122, 101, 112] and entries[0]["spacing"] == [3.0, 3.0, 3.0]
    assert sorted(int(v) for v in np.unique(arr) if v) == entries[0]["label_list"]
    assert MAISI_LABELS["liver"] in entries[0]["label_list"] and BODY_LABEL in entries[0]["label_list"]
    # the crops keep the scan's geometry: same voxel size, origin moved along z
    crop = nib.load(entries[1]["pseudo_label_filename"])
    assert np.allclose(crop.affine[:3, :3], full.affine[:3, :3])


def test_find_masks_ranking_and_tumour_rule():
    db = [
        {"pseudo_label_filename": "a.nii.gz", "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256], "label_list": [1, 3, 200]},
        {"pseudo_label_filename": "b.nii.gz", "spacing": [3.0, 3.0, 3.0], "dim": [128, 128, 128], "label_list": [1, 3, 200]},
        {"pseudo_label_filename": "c.nii.gz", "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256], "label_list": [1, 26, 200]},
        {"pseudo_label_filename": "d.nii.gz", "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256], "label_list": [4, 200]},
    ]
    picks = find_masks(db, ["liver"], [1.5, 1.5, 2.0], [256, 256, 256], num=4, seed=0)
    assert len(picks) == 4 and {p["label"] for p in picks} <= {"a.nii.gz", "b.nii.gz"}  # c has a tumour, d no liver
    assert find_masks(db, ["hepatic tumor"], [1.5, 1.5, 2.0], [256, 256, 256])[0]["label"] == "c.nii.gz"
    assert find_masks(db, ["liver"], [1.5, 1.5, 2.0], [256, 256, 256], seed=3) == find_masks(db, ["liver"], [1.5, 1.5, 2.0], [256, 256, 256], seed=3)
    with pytest.raises(ValueError, match="no mask"):
        find_masks(db, ["brain"], [1.5, 1.5, 2.0], [256, 256, 256])


def test_shipped_demo_database_is_consistent(maisi_bundle):
    db = maisi_bundle / "datasets" / "demo_mask_db" / "mask_db.json"
    for e in load_mask_db(db):
        img = nib.load(e["pseudo_label_filename"])
        assert list(img.shape) == e["dim"]
        assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), e["spacing"])
    assert json.loads(db.read_text())[0]["pseudo_label_filename"] == "masks/mask_000.nii.gz"
