"""Inference glue: which masks to generate from, output names and the per-sample report."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from monai.transforms import MapTransform

from common.data.maisi_masks import find_masks
from common.transforms.maisi import MAISI_LABELS
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

__all__ = ["mask_requests", "requested_label_ids", "NameSampled", "sample_name_formatter", "WriteSampleReportd"]


def mask_requests(
    label_path: str | None,
    mask_db: str | None,
    anatomy_list: Sequence[str],
    spacing: Sequence[float],
    output_size: Sequence[int],
    num: int,
    seed: int,
    controllable_anatomy_size: Sequence[Sequence[Any]] | None = None,
    mask_generator: Any = None,
    mask_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Dataset items, one per output sample, from the first applicable mask source: the user's mask
    (``label_path``), masks generated from ``controllable_anatomy_size`` by ``mask_generator`` (written to
    ``mask_dir``), or masks retrieved from ``mask_db``."""
    if label_path:
        if not Path(label_path).is_file():
            raise InputNotFoundError(f"label mask '{label_path}' (config key 'label_path') does not exist")
        return [{"label": str(label_path)} for _ in range(int(num))]
    if controllable_anatomy_size:
        if mask_generator is None or not mask_dir:
            raise ValueError("controllable_anatomy_size is given but no mask generator / mask_generation_output_dir is configured")
        return [{"label": p} for p in mask_generator.generate_files(controllable_anatomy_size, int(num), mask_dir)]
    if not mask_db or not Path(mask_db).is_file():
        raise InputNotFoundError(
            f"no label_path given and the mask database '{mask_db}' (config key 'mask_db') does not exist"
        )
    # only the file travels through the transforms; the geometry comes from the file itself
    try:
        found = find_masks(mask_db, anatomy_list, spacing, output_size, num=int(num), seed=int(seed))
    except ValueError as e:
        raise InvalidInputError(f"mask database '{mask_db}' (config key 'mask_db'): {e} (config key 'anatomy_list')") from e
    return [{"label": e["label"]} for e in found]


def requested_label_ids(anatomy_list: Sequence[str], keep_all_labels: bool) -> list[int] | None:
    """Label ids kept in the written label map (``None`` = all): the requested anatomy, body kept as 200."""
    if keep_all_labels or not anatomy_list:
        return None
    return [MAISI_LABELS[a] for a in anatomy_list]


class NameSampled(MapTransform):
    """Give the image and label of one sample the same name ``sample_<YYYYmmdd_HHMMSS_ffffff>``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = "sample_" + datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        for key in self.key_iterator(d):
            d[key].meta["sample_name"] = name
        return d


def sample_name_formatter(metadict: Mapping[str, Any], saver: Any) -> dict[str, Any]:
    """``SaveImaged`` name formatter: ``<sample_name>_<postfix>.nii.gz``."""
    return {"subject": str(metadict["sample_name"]), "idx": None}


class WriteSampleReportd(MapTransform):
    """Write ``<output_dir>/<sample_name>.json``: quality check (``passed``/``failed``), draws, spacing, seed."""

    def __init__(
        self, keys: str, output_dir: str, inferer: Any, request: Mapping[str, Any] | None = None, overwrite: bool = False
    ) -> None:
        super().__init__(keys)
        self.output_dir = output_dir
        self.inferer = inferer
        self.request = dict(request or {})
        self.overwrite = bool(overwrite)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            report = dict(self.inferer.last_report)
            qc = report.get("quality_check")
            report["quality_check_result"] = "skipped" if qc is None else ("passed" if all(v["passed"] for v in qc.values()) else "failed")
            report.update(self.request)
            os.makedirs(self.output_dir, exist_ok=True)
            path = refuse_overwrite(Path(self.output_dir) / f"{d[key].meta['sample_name']}.json", self.overwrite)
            with atomic_write(path, "w") as fh:
                fh.write(json.dumps(report, indent=1, default=float))
        return d
