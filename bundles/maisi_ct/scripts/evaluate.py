"""Evaluation glue: VAE reconstruction metrics inside the body, intensity sanity of generated samples and, with a
user-provided segmentation model, label agreement of generated images with their conditioning masks."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform

from common.metrics.image import mae, psnr, ssim3d
from common.transforms.maisi import BODY_LABEL, body_mask_from_ct, quality_check
from common.transforms.validation import load_nifti_checked
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

__all__ = [
    "ReconstructionMetricsd",
    "write_summary",
    "generated_report",
    "require_generated_samples",
    "check_segmentation_model_path",
    "load_segmentation_model",
    "segment_generated",
    "label_agreement",
]


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
    :func:`label_agreement`, run when ``segmentation_model_path`` is set.
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


def check_segmentation_model_path(path: str | os.PathLike | None, key: str = "segmentation_model_path") -> bool:
    """True when a segmentation model is configured (``path`` set); raises when it is set but no file is there.

    Raises:
        InputNotFoundError (a ``FileNotFoundError``): naming the file and the config key.
    """
    if path is None or path == "":
        return False
    if not Path(path).is_file():
        raise InputNotFoundError(
            f"{key}: no TorchScript segmentation model at '{path}'. Set '{key}' (configs/evaluate.json) to an "
            "existing file saved with torch.jit.save, or to null to skip the label agreement."
        )
    return True


def load_segmentation_model(path: str | os.PathLike | None, device: Any = "cpu", key: str = "segmentation_model_path"):
    """The user's TorchScript segmentation model (``torch.jit.load(path, map_location=device)``, eval mode).

    Raises:
        FileNotFoundError: naming the file and the config key when ``path`` is not an existing file.
    """
    if not check_segmentation_model_path(path, key):
        raise InputNotFoundError(f"{key}: no segmentation model configured")
    model = torch.jit.load(str(path), map_location=torch.device(device))
    model.eval()
    return model


def _label_map(label_map: Mapping[Any, Any] | str | os.PathLike | None) -> dict[int, int] | None:
    """``{model output id: MAISI id}`` from a dict or a JSON file (keys may be strings); None = identity."""
    if label_map is None:
        return None
    if isinstance(label_map, (str, os.PathLike)):
        label_map = json.loads(Path(label_map).read_text())
    return {int(k): int(v) for k, v in dict(label_map).items()}


class _Votes(torch.nn.Module):
    """Window function of the sliding-window inference: the model's label ids, mapped to MAISI ids, as one-hot votes
    over ``[other, *ids]``. Blending votes (not ids or logits) keeps window seams valid for both output kinds and
    keeps memory at ``1 + len(ids)`` channels whatever the model's number of classes."""

    def __init__(self, model: Any, ids: list[int], label_map: dict[int, int] | None) -> None:
        super().__init__()
        self.model, self.ids, self.label_map = model, ids, label_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise InvalidInputError(
                f"segmentation_model_path: the model must return (N, C, *spatial) for an input {tuple(x.shape)}, got {tuple(out.shape)}"
            )
        ids = out.argmax(dim=1) if out.shape[1] > 1 else out[:, 0].round().long()
        if self.label_map is not None:
            mapped = torch.zeros_like(ids)
            for src, dst in self.label_map.items():
                mapped[ids == src] = dst
            ids = mapped
        votes = [ids == i for i in self.ids]
        other = ~torch.stack(votes).any(0) if votes else torch.ones_like(ids, dtype=torch.bool)
        return torch.stack([other, *votes], dim=1).float()


@torch.no_grad()
def segment_generated(
    model: Any,
    image_hu: np.ndarray,
    ids: list[int],
    label_map: dict[int, int] | None = None,
    device: Any = "cpu",
    roi_size: Any = (96, 96, 96),
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    intensity: Any = None,
) -> np.ndarray:
    """MAISI label map (restricted to ``ids``, 0 elsewhere) of ``image_hu`` (X, Y, Z) predicted by ``model``.

    The model sees (1, 1, X, Y, Z) float32 on ``device``: HU as stored, or, with ``intensity = [a_min, a_max,
    b_min, b_max]``, HU clipped to [a_min, a_max] and scaled linearly to [b_min, b_max]. It returns (1, C, X, Y,
    Z) logits/probabilities (C > 1, argmax) or (1, 1, X, Y, Z) label ids, mapped to MAISI ids by ``label_map``.
    Sliding window (``roi_size``, gaussian blending of the per-window votes), stitched on the CPU.
    """
    x = torch.as_tensor(np.asarray(image_hu, dtype=np.float32))[None, None]
    if intensity is not None:
        if len(intensity) != 4 or float(intensity[1]) <= float(intensity[0]):
            raise InvalidInputError(f"segmentation_intensity must be [a_min, a_max, b_min, b_max] with a_max > a_min, got {intensity}")
        a_min, a_max, b_min, b_max = (float(v) for v in intensity)
        x = (x.clamp(a_min, a_max) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    inferer = SlidingWindowInferer(roi_size=tuple(int(r) for r in roi_size), sw_batch_size=int(sw_batch_size),
                                   overlap=float(overlap), mode="gaussian", sw_device=torch.device(device), device=torch.device("cpu"))
    votes = inferer(x, _Votes(model, list(ids), label_map))
    lut = torch.as_tensor([0, *ids], dtype=torch.long)
    return lut[votes[0].argmax(0)].numpy()


def label_agreement(
    generated_dir: str | os.PathLike | None,
    model_path: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    label_map: Mapping[Any, Any] | str | None = None,
    device: Any = "cpu",
    roi_size: Any = (96, 96, 96),
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    intensity: Any = None,
    label_dict_file: str | os.PathLike | None = None,
) -> Path | None:
    """Dice of a user segmentation model on each generated image vs its conditioning label -> CSV + summary.

    For every ``sample_*_image.nii.gz`` in ``generated_dir`` and its ``..._label.nii.gz``: the organs are the
    label ids present in the conditioning label (0 and body 200 excluded) that the model can produce (all of them
    without ``label_map``, else the map's values); per organ ``dice = 2|S ∩ L| / (|S| + |L|)`` of the segmentation
    ``S`` (:func:`segment_generated`) and the conditioning label ``L``. Writes ``generated_label_agreement.csv``
    (``sample, organ, id, dice, voxels``; voxels = |L|) and ``generated_label_agreement_summary.json`` (mean Dice
    and number of samples per organ, and the mean over organs). Returns None (nothing written) when
    ``generated_dir`` or ``model_path`` is not set.
    """
    if not model_path:
        return None
    model = load_segmentation_model(model_path, device)  # fails early and clearly on a wrong path
    if not generated_dir:
        return None
    mapping = _label_map(label_map)
    names: dict[int, str] = {}
    if label_dict_file:
        names = {int(v): k for k, v in json.loads(Path(label_dict_file).read_text()).items()}
    producible = None if mapping is None else set(mapping.values())
    rows = []
    for image_path in sorted(Path(generated_dir).glob("sample_*_image.nii.gz")):
        label_path = image_path.with_name(image_path.name.replace("_image.nii.gz", "_label.nii.gz"))
        label = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int64)
        ids = [int(i) for i in np.unique(label) if i not in (0, BODY_LABEL) and (producible is None or int(i) in producible)]
        if not ids:
            continue
        image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
        if image.shape != label.shape:
            raise InvalidInputError(f"{image_path.name}: image {image.shape} and label {label.shape} differ in size")
        seg = segment_generated(model, image, ids, mapping, device, roi_size, sw_batch_size, overlap, intensity)
        for i in ids:
            ref, pred = label == i, seg == i
            rows.append({
                "sample": image_path.name,
                "organ": names.get(i, str(i)),
                "id": i,
                "dice": 2.0 * float(np.logical_and(ref, pred).sum()) / float(ref.sum() + pred.sum()),
                "voxels": int(ref.sum()),
            })
    os.makedirs(output_dir, exist_ok=True)
    out = Path(output_dir) / "generated_label_agreement.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample", "organ", "id", "dice", "voxels"])
        writer.writeheader()
        writer.writerows(rows)
    per_organ: dict[str, dict[str, Any]] = {}
    for r in rows:
        per_organ.setdefault(r["organ"], {"id": r["id"], "dice": []})["dice"].append(r["dice"])
    summary = {
        "per_organ": {k: {"id": v["id"], "mean_dice": float(np.mean(v["dice"])), "n": len(v["dice"])} for k, v in per_organ.items()},
        "mean_dice": float(np.mean([np.mean(v["dice"]) for v in per_organ.values()])) if per_organ else None,
        "n_samples": len({r["sample"] for r in rows}),
    }
    (Path(output_dir) / "generated_label_agreement_summary.json").write_text(json.dumps(summary, indent=1))
    return out
