"""Inference glue: which masks to generate from, output names and the per-sample report."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from monai.transforms import MapTransform

from common.data.maisi_masks import ensure_mask_folder, find_masks
from common.transforms.maisi import MAISI_LABELS
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

__all__ = ["mask_requests", "KeepSampled", "requested_label_ids", "NameSampled", "sample_name_formatter", "WriteSampleReportd"]


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
    mask_db_dir: str | None = None,
    body_region: Sequence[str] | None = None,
    max_try: int = 2,
    survival_transform: Any = None,
    large_files: str | None = None,
) -> list[dict[str, Any]]:
    """Dataset items in the order the sampler tries them, from the first applicable mask source: the user's mask
    (``label_path``, repeated ``num`` times), masks generated from ``controllable_anatomy_size`` by
    ``mask_generator`` (written to ``mask_dir``), or candidates retrieved from ``mask_db``
    (:func:`common.data.maisi_masks.find_masks`; file names relative to ``mask_db_dir``, the official unzipped mask
    folder, unzipped from ``<mask_db_dir>.zip`` on first use, or to the JSON's folder when ``mask_db_dir`` is null).

    ``survival_transform``: the inference preprocessing, used to check that the requested labels survive the
    resampling of a closest-match mask to the requested grid."""
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
    if mask_db_dir:
        ensure_mask_folder(mask_db_dir, large_files=large_files)
    wanted = {MAISI_LABELS[a] for a in anatomy_list if a in MAISI_LABELS}

    def survives(item: dict[str, Any]) -> bool:
        if survival_transform is None or not wanted:
            return True
        label = survival_transform({"label": item["label"]})["label"]
        return wanted <= {int(v) for v in torch.unique(torch.as_tensor(label)).tolist()}

    try:
        found = find_masks(mask_db, anatomy_list, spacing, output_size, num=int(num), seed=int(seed),
                           body_region=body_region, mask_dir=mask_db_dir, max_try=int(max_try), survives=survives)
    except ValueError as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"mask database '{mask_db}' (config key 'mask_db'): {e} (config key 'anatomy_list')") from e
    # only the file and the augmentation flag travel through the transforms; the geometry comes from the file itself.
    # The database fields stay out: MONAI treats every ``label_*`` key (e.g. ``label_list``) as metadata of ``label``.
    return [{"label": c["label"], "augment": bool(c.get("augment", True))} for c in found]


class KeepSampled(MapTransform):
    """Decide whether a generated sample is kept (official rule, :class:`~common.data.maisi_masks.MaskCandidateQueue`)
    and run ``transforms`` (naming, filtering, saving, report) only for kept samples; a dropped sample's mask is
    replaced by the next candidate."""

    def __init__(self, keys: str, queue: Any, inferer: Any, transforms: Sequence[Any]) -> None:
        super().__init__(keys)
        from monai.transforms import Compose

        self.queue = queue
        self.inferer = inferer
        self.transforms = Compose(list(transforms))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        report = self.inferer.last_report
        qc = report.get("quality_check")
        passed = qc is None or all(v["passed"] for v in qc.values())
        keep = self.queue.decide(passed) if hasattr(self.queue, "decide") else True
        report["kept"] = bool(keep)
        report["masks_tried"] = int(getattr(self.queue, "tried", 1))
        for key in self.key_iterator(d):
            report["mask"] = str(getattr(d[key], "meta", {}).get("filename_or_obj", ""))
        return self.transforms(d) if keep else d


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
