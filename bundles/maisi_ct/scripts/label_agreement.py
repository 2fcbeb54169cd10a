"""Label agreement of generated images with their conditioning masks (``evaluate.json``, ``segmentation_model_path``).

A segmentation model of the user's own (TorchScript) segments every generated image; per organ of its conditioning
label map, the Dice of that segmentation vs the label is written to ``generated_label_agreement.csv`` and
summarised in ``generated_label_agreement_summary.json``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from common.transforms.maisi import BODY_LABEL
from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["check_segmentation_model_path", "load_segmentation_model", "segment_generated", "label_agreement"]


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
