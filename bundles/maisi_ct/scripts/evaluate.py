"""Evaluation glue: VAE reconstruction metrics inside the body and intensity sanity of generated samples.

Label agreement of generated images with their conditioning masks (a user-provided segmentation model) is in
:mod:`scripts.label_agreement`."""

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
from common.transforms.validation import load_nifti_checked
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

__all__ = ["ReconstructionMetricsd", "write_summary", "generated_report", "require_generated_samples"]


class ReconstructionMetricsd(MapTransform):
    """Per-volume PSNR / SSIM on the [0, 1] scale (data range 1) and MAE in HU, inside the body mask.

    The body mask is ``HU > -500``, largest component, holes filled, computed on the real CT. Rows are
    kept in memory and written to ``<output_dir>/reconstruction_metrics.csv`` by :meth:`write` (atomically, at
    the end of the run: a failed run leaves no partial table; an existing table is refused unless ``overwrite``).
    """

    def __init__(self, keys: str = "pred", target_key: str = "label", output_dir: str = ".", overwrite: bool = False) -> None:
        super().__init__(keys)
        self.target_key = target_key
        self.csv = Path(output_dir) / "reconstruction_metrics.csv"
        self.overwrite = bool(overwrite)
        self.rows: list[dict[str, Any]] = []

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
            self.rows.append(row)
        return d

    def write(self) -> Path:
        """Write the rows gathered so far to ``reconstruction_metrics.csv`` (atomically)."""
        if not self.rows:
            raise InvalidInputError(f"no image was evaluated: nothing to write to '{self.csv}' (is the datalist section empty?)")
        refuse_overwrite(self.csv, self.overwrite)
        with atomic_write(self.csv, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        return self.csv


def write_summary(output_dir: str, metrics: ReconstructionMetricsd | None = None, overwrite: bool = False) -> dict[str, float]:
    """Mean of every metric column of ``reconstruction_metrics.csv`` -> ``reconstruction_summary.json``.

    With ``metrics`` (the run's :class:`ReconstructionMetricsd`), its table is written first. Both files are
    written atomically; an existing summary is refused unless ``overwrite``."""
    if metrics is not None:
        metrics.write()
    path = Path(output_dir) / "reconstruction_metrics.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    summary = {k: float(np.mean([float(r[k]) for r in rows])) for k in ("psnr", "ssim", "mae_hu")}
    summary["n"] = len(rows)
    out = refuse_overwrite(Path(output_dir) / "reconstruction_summary.json", overwrite)
    with atomic_write(out, "w") as fh:
        fh.write(json.dumps(summary, indent=1))
    return summary


def generated_report(generated_dir: str | None, statistics_file: str, output_dir: str, overwrite: bool = False) -> Path | None:
    """Per-organ median HU of every generated sample against the quality-check table -> ``generated_qc.csv``.

    Each sample and its label are loaded with the checks of :func:`load_nifti_checked` and must share their grid;
    the table is written atomically and an existing one is refused unless ``overwrite``.

    Label-image agreement (Dice of a segmenter on the generated image vs its conditioning mask) is
    :func:`scripts.label_agreement.label_agreement`, run when ``segmentation_model_path`` is set.
    """
    if not generated_dir:
        return None
    stats = json.loads(Path(statistics_file).read_text())
    rows = []
    for image_path in require_generated_samples(generated_dir):
        label_path = image_path.with_name(image_path.name.replace("_image.nii.gz", "_label.nii.gz"))
        image = np.asarray(load_nifti_checked(image_path, "generated image").dataobj)
        label = np.asarray(load_nifti_checked(label_path, "generated label").dataobj)
        if image.shape != label.shape:
            raise InvalidInputError(
                f"generated image '{image_path}' has shape {image.shape} but its label '{label_path}' has {label.shape}; "
                "expected the same grid"
            )
        qc = quality_check(image, label, stats)
        for organ, res in qc.items():
            rows.append({"sample": image_path.name, "organ": organ, **res})
    out = refuse_overwrite(Path(output_dir) / "generated_qc.csv", overwrite)
    with atomic_write(out, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample", "organ", "median", "low", "high", "passed"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def require_generated_samples(generated_dir: str | os.PathLike, key: str = "generated_dir", check_files: bool = False) -> list[Path]:
    """The ``sample_*_image.nii.gz`` files of ``generated_dir`` (inference outputs); refused when there are none.

    ``check_files`` (the up-front check of ``evaluate.json``, before the reconstruction tables are written): every
    image has its ``..._label.nii.gz``, both have a sound NIfTI header and the same shape."""
    folder = Path(generated_dir)
    if not folder.is_dir():
        raise InputNotFoundError(f"folder '{generated_dir}' (config key '{key}') does not exist")
    images = sorted(folder.glob("sample_*_image.nii.gz"))
    if not images:
        raise InvalidInputError(
            f"folder '{generated_dir}' (config key '{key}') holds no sample_*_image.nii.gz; expected the output_dir of "
            "an inference run"
        )
    if check_files:
        from common.transforms.validation import check_image_file

        for image_path in images:
            label_path = image_path.with_name(image_path.name.replace("_image.nii.gz", "_label.nii.gz"))
            if not label_path.is_file():
                raise InputNotFoundError(
                    f"generated label '{label_path}' (the label of '{image_path.name}', config key '{key}') does not exist"
                )
            shapes = [nib.load(str(check_image_file(f, key))).shape for f in (image_path, label_path)]
            if shapes[0] != shapes[1]:
                raise InvalidInputError(
                    f"generated image '{image_path}' has shape {shapes[0]} but its label '{label_path}' has {shapes[1]}; "
                    "expected the same grid"
                )
    return images
