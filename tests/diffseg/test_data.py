"""Preprocessing transforms and datalist builders of the diffseg bundle (spec §5, §9)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd

from common.data.seg_datalists import (
    AMOS_LABELS,
    build_amos_datalist,
    build_msd_datalist,
    build_pelvic_datalist,
    median_spacing,
)
from common.transforms.segmentation import AMOS_HU_WINDOW, ResampleToSpacingd, intensity_transform


def test_mr_percentile_rule_on_a_ramp():
    ramp = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 10, 10)  # values 0..999
    out = intensity_transform(["image"], "MR")({"image": ramp})["image"]
    lo, hi = np.percentile(ramp.numpy(), [0.5, 99.5])  # 4.995, 994.005
    assert abs(lo - 4.995) < 1e-6 and abs(hi - 994.005) < 1e-6
    out = torch.as_tensor(out)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # values below the 0.5th / above the 99.5th percentile are clipped, the rest is linear
    assert int((out == 0).sum()) == 5 and int((out == 1).sum()) == 5
    torch.testing.assert_close(out.flatten()[500], torch.tensor((500 - lo) / (hi - lo), dtype=torch.float32))


def test_amos_hu_window():
    assert AMOS_HU_WINDOW == (-991.0, 362.0)
    hu = torch.tensor([-2000.0, -991.0, -314.5, 362.0, 3000.0]).reshape(1, 5, 1, 1)
    out = torch.as_tensor(intensity_transform(["image"], "CT")({"image": hu})["image"]).flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_resample_to_spacing_on_demo_ct_is_invertible(ct_demo):
    entry = json.loads(ct_demo.read_text())["test"][0]
    path = str(ct_demo.parent / entry["label"])
    pre = Compose(
        [
            LoadImaged("label", image_only=True),
            EnsureChannelFirstd("label"),
            Orientationd("label", axcodes="RAS", labels=None),
            ResampleToSpacingd("label", [6.0, 6.0, 6.0], mode="nearest"),
        ]
    )
    # a server-added string item next to the image must not break the transform
    d = pre({"label": path, "image_path": path})
    assert all(abs(s - o / 2) <= 1 for s, o in zip(d["label"].shape[1:], (122, 101, 112)))  # 3 mm -> 6 mm
    np.testing.assert_allclose(np.sqrt((np.asarray(d["label"].affine)[:3, :3] ** 2).sum(0)), [6.0, 6.0, 6.0], atol=1e-6)
    d["pred"] = d["label"].clone()
    inv = Invertd("pred", pre, orig_keys="label", nearest_interp=True)(d)
    ref = nib.load(path)
    assert tuple(inv["pred"].shape[1:]) == ref.shape
    np.testing.assert_allclose(np.asarray(inv["pred"].affine), ref.affine, atol=1e-5)
    # nearest down/up-sampling keeps most of the organ voxels
    orig = np.asarray(ref.dataobj)
    agree = (np.asarray(inv["pred"][0]) == orig)[orig > 0].mean()
    assert agree > 0.8


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _touch_listed(root, entries):
    """Empty stand-ins for the listed files whose content these layout tests do not read."""
    for e in entries:
        for rel in e.values():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).touch()


def test_amos_datalist_keeps_ct_and_splits_validation(tmp_path):
    train = [{"image": f"./imagesTr/amos_{i:04d}.nii.gz", "label": f"./labelsTr/amos_{i:04d}.nii.gz"} for i in (1, 5, 499, 507, 600)]
    val = [{"image": f"./imagesVa/amos_{i:04d}.nii.gz", "label": f"./labelsVa/amos_{i:04d}.nii.gz"} for i in range(10, 30)]
    val += [{"image": "./imagesVa/amos_0550.nii.gz", "label": "./labelsVa/amos_0550.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": train, "validation": val, "labels": AMOS_LABELS}))
    _touch_listed(tmp_path, train + val)  # the builder checks that every listed file exists
    out = json.loads(build_amos_datalist(tmp_path).read_text())
    assert [e["id"] for e in out["training"]] == ["amos_0001", "amos_0005", "amos_0499"]  # MR ids > 500 dropped
    assert [e["id"] for e in out["validation"]] == ["amos_0010", "amos_0011"]  # first 10 % of the 20 CT cases
    assert len(out["test"]) == 18 and out["test"][0]["image"] == "imagesVa/amos_0012.nii.gz"
    assert out["labels"]["15"] == "prostate/uterus" and len(out["labels"]) == 16


def test_pelvic_datalist_split_per_institution(tmp_path):
    lines = ["key,institution"]
    sizes = {"UCL": 12, "bergen": 8}
    for inst, n in sizes.items():
        lines += [f"{inst.lower()}{i:03d},{inst}" for i in range(n)]
    (tmp_path / "institution.txt").write_text("\n".join(lines) + "\n")
    _touch_listed(tmp_path, [{"image": f"{u.split(',')[0]}_img.nii", "label": f"{u.split(',')[0]}_mask.nii"} for u in lines[1:]])
    out = json.loads(build_pelvic_datalist(tmp_path).read_text())
    ucl = {k: [e["id"] for e in out[k] if e["institution"] == "UCL"] for k in ("training", "validation", "test")}
    assert ucl["validation"] == ["ucl000", "ucl001"]
    assert ucl["training"] == [f"ucl{i:03d}" for i in range(2, int(0.75 * 12) - 2)]
    assert ucl["test"] == [f"ucl{i:03d}" for i in range(int(0.75 * 12) - 2, 12)]
    assert sum(len(out[k]) for k in ("training", "validation", "test")) == 20
    assert out["training"][0]["image"] == "ucl002_img.nii" and out["training"][0]["label"] == "ucl002_mask.nii"
    assert len(out["labels"]) == 9


def test_msd_datalist_seeded_80_10_10_and_median_spacing(tmp_path):
    cases = [f"prostate_{i:02d}" for i in range(20)]
    for i, c in enumerate(cases):
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.6, 0.6, 3.0 + (i % 3), 1.0]))
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        nib.save(img, str(tmp_path / "imagesTr" / f"{c}.nii.gz"))
    meta = {
        "name": "Prostate",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in reversed(cases)],
        "test": ["./imagesTs/prostate_99.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    _touch_listed(tmp_path, [{"label": e["label"]} for e in meta["training"]])
    a = json.loads(build_msd_datalist(tmp_path, tmp_path / "a.json").read_text())
    b = json.loads(build_msd_datalist(tmp_path, tmp_path / "b.json").read_text())
    c = json.loads(build_msd_datalist(tmp_path, tmp_path / "c.json", seed=1).read_text())
    assert (len(a["training"]), len(a["validation"]), len(a["test"])) == (16, 2, 2)
    assert a == b and a["training"] != c["training"]  # seeded, independent of file order
    ids = [e["id"] for k in ("training", "validation", "test") for e in a[k]]
    assert sorted(ids) == cases
    assert a["unlabelled_test"] == [{"image": "imagesTs/prostate_99.nii.gz"}]
    np.testing.assert_allclose(median_spacing(tmp_path, tmp_path / "a.json"), [0.6, 0.6, 4.0], atol=1e-6)
