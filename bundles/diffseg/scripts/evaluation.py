"""Evaluation glue: per-case metrics CSV and summary CSV from the evaluator's outputs.

Metrics are computed on the preprocessed grid (as the official code does) with the physical
spacing of that grid, by ``common.metrics.segmentation``: per class c >= 1 Dice, IoU, HD95, NSD at
``nsd_tolerance`` mm, mean surface distance and centroid distance.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from common.bundle import case_name, check_outputs
from common.metrics.segmentation import segmentation_metrics, summarise
from common.utils.io import atomic_write

__all__ = ["SegmentationMetricsWriter"]

#: the files metrics are written to, in ``output_dir``
METRICS_FILES = ("metrics_per_case.csv", "metrics_summary.csv")

_CASE_COLUMNS = ["case", "class", "name", "dice", "iou", "hd95", "nsd", "msd", "cd"]


def _spacing(t: torch.Tensor) -> list[float]:
    affine = getattr(t, "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return [float(v) for v in np.sqrt((a**2).sum(axis=0))]


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
        class_names: ``{"1": "liver", ...}`` for the ``name`` column (optional; a datalist's ``labels``
            entry, anything but a mapping is ignored).
        nsd_tolerance: NSD tolerance in mm (spec: 1 mm).
        overwrite: replace existing CSV files; by default an existing one is refused when the
            engine starts (before any inference) and again before writing.
    """

    def __init__(
        self,
        output_dir: str,
        num_classes: int,
        class_names: dict | None = None,
        nsd_tolerance: float = 1.0,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_classes = int(num_classes)
        names = class_names if isinstance(class_names, Mapping) else {}
        self.class_names = {int(k): v for k, v in names.items()}
        self.nsd_tolerance = float(nsd_tolerance)
        self.overwrite = bool(overwrite)
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def check_outputs(self) -> None:
        """The metric tables are not there yet (unless ``overwrite``) and their folder can be written: checked
        when the evaluation starts and again before they are written (another run may have written them since)."""
        check_outputs(self.output_dir, self.overwrite, [self.output_dir / name for name in METRICS_FILES])

    def on_started(self, engine) -> None:
        self.rows.clear()
        self.check_outputs()

    def on_iteration(self, engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for item in outputs:
            pred, label = item["pred"], item["label"]
            # the file of the label (else image, prediction): <case>/label.nii.gz gives <case>
            case = case_name(item, image_keys=("label", "image", "pred"))
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
        self.check_outputs()
        summary = summarise(self.rows)
        for s in summary:
            s["name"] = self.class_names.get(s["class"], "") if s["class"] != "overall" else "mean over classes >= 1"
        columns = ["class", "name", "n"] + [k for k in summary[-1] if k not in ("class", "name", "n")]
        _write_csv(self.output_dir / METRICS_FILES[0], self.rows, _CASE_COLUMNS)
        _write_csv(self.output_dir / METRICS_FILES[1], summary, columns)
