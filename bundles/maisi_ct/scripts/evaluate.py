"""Evaluation glue: VAE reconstruction metrics inside the body, and intensity sanity of generated samples."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import MapTransform

from common.metrics.image import mae, psnr, ssim3d
from common.transforms.maisi import body_mask_from_ct, quality_check

__all__ = ["ReconstructionMetricsd", "write_summary", "generated_report"]


class ReconstructionMetricsd(MapTransform):
    """Per-volume PSNR / SSIM on the [0, 1] scale (data range 1) and MAE in HU, inside the body mask.

    The body mask is ``HU > -500``, largest component, holes filled, computed on the real CT. Rows are
    appended to ``<output_dir>/reconstruction_metrics.csv``.
    """

    def __init__(self, keys: str = "pred", target_key: str = "label", output_dir: str = ".") -> None:
        super().__init__(keys)
        self.target_key = target_key
        self.csv = Path(output_dir) / "reconstruction_metrics.csv"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = np.clip(np.asarray(d[key].detach().cpu())[0], 0, 1)
            target = np.asarray(d[self.target_key].detach().cpu())[0]
            body = body_mask_from_ct(target * 2000.0 - 1000.0)
            row = {
                "image": str(d[self.target_key].meta.get("filename_or_obj", "")),
                "psnr": psnr(pred, target, data_range=1.0, mask=body),
                "ssim": ssim3d(pred, target, data_range=1.0, mask=body),
                "mae_hu": mae(pred * 2000.0, target * 2000.0, mask=body),
                "body_voxels": int(body.sum()),
            }
            os.makedirs(self.csv.parent, exist_ok=True)
            new = not self.csv.is_file()
            with open(self.csv, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        return d


def write_summary(output_dir: str) -> dict[str, float]:
    """Mean of every metric column of ``reconstruction_metrics.csv`` -> ``reconstruction_summary.json``."""
    path = Path(output_dir) / "reconstruction_metrics.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    summary = {k: float(np.mean([float(r[k]) for r in rows])) for k in ("psnr", "ssim", "mae_hu")}
    summary["n"] = len(rows)
    (Path(output_dir) / "reconstruction_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def generated_report(generated_dir: str | None, statistics_file: str, output_dir: str) -> Path | None:
    """Per-organ median HU of every generated sample against the quality-check table -> ``generated_qc.csv``.

    Label-image agreement (Dice of a segmenter on the generated image vs its conditioning mask) needs a
    user-provided segmentation model and is not computed here.
    """
    if not generated_dir:
        return None
    stats = json.loads(Path(statistics_file).read_text())
    rows = []
    for image_path in sorted(Path(generated_dir).glob("sample_*_image.nii.gz")):
        label_path = image_path.with_name(image_path.name.replace("_image.nii.gz", "_label.nii.gz"))
        qc = quality_check(np.asarray(nib.load(str(image_path)).dataobj), np.asarray(nib.load(str(label_path)).dataobj), stats)
        for organ, res in qc.items():
            rows.append({"sample": image_path.name, "organ": organ, **res})
    out = Path(output_dir) / "generated_qc.csv"
    os.makedirs(output_dir, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample", "organ", "median", "low", "high", "passed"])
        writer.writeheader()
        writer.writerows(rows)
    return out
