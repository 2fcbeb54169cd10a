"""Evaluation glue: per-case metrics CSV and summary CSV from the evaluator's outputs.

Metrics are computed on the preprocessed grid (as the official code does) with the physical
spacing of that grid, by ``common.metrics.segmentation``: per class c >= 1 Dice, IoU, HD95, NSD at
``nsd_tolerance`` mm, mean surface distance and centroid distance.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from common.metrics.segmentation import segmentation_metrics, summarise
from common.utils.io import atomic_write

__all__ = ["SegmentationMetricsWriter", "check_outputs", "class_names", "load_datalist"]

_CASE_COLUMNS = ["case", "class", "name", "dice", "iou", "hd95", "nsd", "msd", "cd"]


def _spacing(t: torch.Tensor) -> list[float]:
    affine = getattr(t, "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return [float(v) for v in np.sqrt((a**2).sum(axis=0))]


def _case_name(item: dict) -> str:
    for key in ("label", "image", "pred"):
        t = item.get(key)
        meta = getattr(t, "meta", None) or {}
        name = meta.get("filename_or_obj")
        if name:
            p = Path(str(name))
            base = p.name.split(".")[0]
            # demo and Decathlon layouts: <case>/image.nii.gz or imagesTs/<case>.nii.gz
            return p.parent.name if base in ("image", "label") and p.parent.name else base
    return "case"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_write(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


class SegmentationMetricsWriter:
    """Ignite handler: per-case metrics on ``pred``/``label`` label maps, CSVs written on completion.

    Args:
        output_dir: folder of ``metrics_per_case.csv`` and ``metrics_summary.csv``.
        num_classes: C, background included.
        class_names: ``{"1": "liver", ...}`` for the ``name`` column (optional).
        nsd_tolerance: NSD tolerance in mm (spec: 1 mm).
    """

    def __init__(self, output_dir: str, num_classes: int, class_names: dict | None = None, nsd_tolerance: float = 1.0) -> None:
        self.output_dir = Path(output_dir)
        self.num_classes = int(num_classes)
        self.class_names = {int(k): v for k, v in (class_names or {}).items()}
        self.nsd_tolerance = float(nsd_tolerance)
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def on_iteration(self, engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for item in outputs:
            pred, label = item["pred"], item["label"]
            case = _case_name(item)
            rows = segmentation_metrics(
                pred.detach().cpu().numpy()[0], label.detach().cpu().numpy()[0], self.num_classes,
                spacing=_spacing(label), nsd_tolerance=self.nsd_tolerance,
            )
            for r in rows:
                r.update(case=case, name=self.class_names.get(int(r["class"]), str(r["class"])))
            self.rows.extend(rows)

    def on_completed(self, engine) -> None:
        rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
        if not rank0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(self.output_dir / "metrics_per_case.csv", self.rows, _CASE_COLUMNS)
        summary = summarise(self.rows)
        for s in summary:
            s["name"] = self.class_names.get(s["class"], "") if s["class"] != "overall" else "mean over classes >= 1"
        columns = ["class", "name", "n"] + [k for k in summary[-1] if k not in ("class", "name", "n")]
        _write_csv(self.output_dir / "metrics_summary.csv", summary, columns)


def check_outputs(output_dir: str, overwrite: bool, pattern: str = "*_seg.nii.gz") -> str:
    """Refuse to run into an ``output_dir`` that already holds predictions, unless ``overwrite``."""
    found = sorted(Path(output_dir).rglob(pattern)) if os.path.isdir(output_dir) else []
    if found and not overwrite:
        raise FileExistsError(
            f"'{output_dir}' already holds {len(found)} prediction(s) (e.g. {found[0].name}); "
            "pass --overwrite true or another --output_dir"
        )
    return output_dir


def load_datalist(datalist_file: str, key: str, base_dir: str) -> list[dict]:
    """``load_decathlon_datalist`` that returns ``[]`` (with a warning) when the JSON does not exist yet.

    Static checks (MONAI Label, ``check_properties``) build the dataset without the data being
    there; an actual run with an empty list stops at the data loader.
    """
    from monai.data import load_decathlon_datalist

    if not os.path.isfile(datalist_file):
        logging.getLogger(__name__).warning(
            "datalist '%s' not found: build it with common.data.seg_datalists (see the model card)", datalist_file
        )
        return []
    return load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key=key, base_dir=base_dir)


def class_names(datalist_file: str) -> dict:
    """The ``labels`` dictionary of a datalist JSON (``{}`` if absent)."""
    import json

    if not os.path.isfile(datalist_file):
        return {}
    return dict(json.loads(Path(datalist_file).read_text()).get("labels", {}))
