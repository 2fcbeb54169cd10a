#!/usr/bin/env python
"""Choose diffseg's ``min_component_mm3`` on validation slabs of the training cohort, not on the test CT.

A segmentation of a slab of the abdomen can hold small islands of an organ the slab does not
contain (a few voxels of bladder at the cut of the upper abdomen, liver in the pelvis); each
scores its class 0. ``inference.json``'s ``RemoveSmallComponentsd`` (``min_component_mm3``)
removes components below a volume, at the risk of cutting true organ tips at a slab's edge. This
script picks the volume where it belongs, on data the model was not tested on:

1. Each ``validation`` case of the cohort's datalist (deformed CTs held out of training) is
   framed as users' scans are: the whole scan and 90 mm slabs (``--slab-mm``) at ``--n-slabs``
   evenly spaced heights, top and bottom of the scan included, every file keeping the physical
   position of its voxels.
2. The model runs once per case through ``inference.json + evaluate.json (+ train_baseline.json)
   + demo.json`` with ``min_component_mm3: 0`` (the written label maps, in each input's geometry).
3. Each threshold of ``--thresholds`` is applied to those label maps (component volumes from the
   input's own voxel size) and scored against the reference labels on the input grid: per case,
   the mean Dice over the foreground classes in the reference or the prediction (a class predicted
   where the reference has none scores 0, as in ``evaluate.json``).

The chosen threshold is the one with the highest mean over all cases (the smallest of equal
ones). Confirm it on the test framings through the full pipeline (``benchmarks/diffseg_demo.py``
with ``min_component_mm3`` in the overlay).

Usage (from the repository root)::

    python benchmarks/diffseg_component_threshold.py --datalist <cohort>/ct/datalist.json \\
        --diffusion-ckpt <models>/model.pt --out runs/diffseg_threshold

Prints one JSON document (also ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "bundles" / "diffseg"))  # the bundle's scripts/ package, as monai.bundle run finds it


def build_slabs(datalist: Path, out: Path, slab_mm: float, n_slabs: int) -> Path:
    """The cohort's validation cases, whole and cut into slabs; returns the new datalist."""
    import nibabel as nib

    from common.data.demo import _slab, save_nifti

    entries = []
    for case in json.loads(datalist.read_text())["validation"]:
        img = nib.load(str(datalist.parent / case["image"]))
        hu = np.asarray(img.dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(datalist.parent / case["label"])).dataobj).astype(np.uint8)
        affine = np.asarray(img.affine, dtype=np.float64)
        thick = int(round(slab_mm / float(img.header.get_zooms()[2])))
        depth = hu.shape[2]
        starts = sorted({int(round(s)) for s in np.linspace(0, depth - thick, n_slabs)})
        framings = {case["id"]: (hu, label, affine)}
        for s in starts:
            cut_hu, cut_affine = _slab(hu, affine, s, s + thick)
            framings[f"{case['id']}_slab{s:03d}"] = (cut_hu, _slab(label, affine, s, s + thick)[0], cut_affine)
        for cid, (image, lab, aff) in framings.items():
            save_nifti(out / cid / "image.nii.gz", image, aff, np.float32)
            save_nifti(out / cid / "label.nii.gz", lab, aff, np.uint8)
            entries.append({"id": cid, "image": f"{cid}/image.nii.gz", "label": f"{cid}/label.nii.gz"})
    path = out / "datalist.json"
    path.write_text(json.dumps({"name": "validation_slabs", "training": [], "test": entries}, indent=1))
    return path


def sweep(slab_list: Path, pred_dir: Path, thresholds: list[float]) -> dict:
    """Mean Dice of each case after removing components below each threshold."""
    import nibabel as nib

    from common.transforms.segmentation import RemoveSmallComponentsd
    from diffseg_demo import case_dice

    results: dict[str, dict] = {}
    for case in json.loads(slab_list.read_text())["test"]:
        pred_img = nib.load(str(next((pred_dir / case["id"]).glob("*_seg.nii.gz"))))
        pred = np.asarray(pred_img.dataobj).astype(np.int16)
        ref = np.asarray(nib.load(str(slab_list.parent / case["label"])).dataobj)
        zooms = [float(z) for z in pred_img.header.get_zooms()[:3]]
        results[case["id"]] = {}
        for t in thresholds:
            cleaned = RemoveSmallComponentsd("pred", min_size_mm3=t, pixdim=zooms)({"pred": pred[None]})["pred"][0]
            results[case["id"]][str(t)] = case_dice(cleaned, ref)
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", required=True, help="the cohort's datalist.json (its 'validation' cases are used)")
    ap.add_argument("--diffusion-ckpt", default=None, help="the diffusion model's weights (default: the shipped demo model)")
    ap.add_argument("--baseline-ckpt", default=None, help="the baseline's weights (default: the shipped demo baseline)")
    ap.add_argument("--models", nargs="+", default=["diffusion"], choices=["diffusion", "baseline"])
    ap.add_argument("--out", default="runs/diffseg_threshold")
    ap.add_argument("--slab-mm", type=float, default=90.0)
    ap.add_argument("--n-slabs", type=int, default=4)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0, 250, 500, 1000, 2000, 4000, 8000])
    args = ap.parse_args(argv)

    from diffseg_demo import evaluate

    out = Path(args.out).resolve()
    slab_list = build_slabs(Path(args.datalist).resolve(), out / "cases", args.slab_mm, args.n_slabs)
    results: dict = {"slab_mm": args.slab_mm, "thresholds_mm3": args.thresholds}
    for model in args.models:
        ckpt = args.diffusion_ckpt if model == "diffusion" else args.baseline_ckpt
        pred_dir = out / model
        evaluate(model, slab_list, pred_dir, ckpt, min_component_mm3=0.0)
        per_case = sweep(slab_list, pred_dir, args.thresholds)
        means = {str(t): float(np.mean([c[str(t)]["mean_dice"] for c in per_case.values()])) for t in args.thresholds}
        slabs_only = {
            str(t): float(np.mean([c[str(t)]["mean_dice"] for k, c in per_case.items() if "_slab" in k])) for t in args.thresholds
        }
        best = max(args.thresholds, key=lambda t: (round(means[str(t)], 6), -t))
        results[model] = {"mean_dice_all_cases": means, "mean_dice_slabs": slabs_only, "chosen_mm3": best, "per_case": per_case}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({m: {k: v for k, v in results[m].items() if k != "per_case"} for m in args.models}, indent=1))
    return results


if __name__ == "__main__":
    main()
