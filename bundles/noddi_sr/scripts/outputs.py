"""Output-file safety of the inference and evaluation configs: the files a run writes, named as
:func:`common.bundle.case_name` names a case (its ``id``, else the stem of its DWI file)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import MapTransform

from common.bundle import check_outputs, planned_outputs

__all__ = ["planned_files", "RefuseExistingOutputsd", "AttachStdd"]


def planned_files(
    data: Sequence[Mapping], output_dir: str | os.PathLike, postfixes: Sequence[str], extra: Sequence[str] = ()
) -> list[Path]:
    """Every file a run writes in ``output_dir``: ``<case>_<postfix>.nii.gz`` per case (two cases writing the same
    file are refused, :func:`common.bundle.planned_outputs`) and the run-wide files ``extra`` (metrics, montages)."""
    files = list(planned_outputs(data, output_dir, postfixes, image_keys=("dwi",)))
    return files + [Path(output_dir) / name for name in extra if Path(output_dir) / name not in files]


class RefuseExistingOutputsd(MapTransform):
    """Raise before anything is written when an output of this case exists and ``overwrite`` is false.

    The names are those ``SaveImaged(output_dir, output_postfix=p, separate_folder=False)`` will use:
    ``<output_dir>/<stem>_<p>.nii.gz`` for every postfix, with the stem of the case id (``case_key``) or of the
    input file (as :class:`common.transforms.dwi.HRMapsd` names the maps). Placed in the preprocessing, it fails
    before any sampling is spent (the run's first items checked every case already: this catches a file written
    since).
    """

    def __init__(self, keys: str, output_dir: str, postfixes: Sequence[str], overwrite: bool = False, case_key: str = "id") -> None:
        super().__init__(keys)
        self.output_dir, self.postfixes, self.overwrite = Path(output_dir), list(postfixes), bool(overwrite)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            planned = planned_outputs([d], self.output_dir, self.postfixes, id_key=self.case_key, image_keys=(key,))
            check_outputs(self.output_dir, self.overwrite, planned)
        return d


class AttachStdd(MapTransform):
    """Copy the per-voxel std over the K samples of the last inferer call next to the maps (``<key>_std``).

    The std has the geometry of ``keys`` (run after :class:`common.transforms.dwi.HRMapsd`); without several samples
    (``num_samples`` < 2) nothing is added.
    """

    def __init__(self, keys: str, inferer: Any, std_key: str = "pred_std") -> None:
        super().__init__(keys)
        self.inferer, self.std_key = inferer, std_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        std = getattr(self.inferer, "last_std", None)
        if std is None:
            return d
        for key in self.key_iterator(d):
            from monai.data import MetaTensor

            ref = d[key]
            d[self.std_key] = MetaTensor(std[0].to(ref.device) * (ref.abs().sum(0, keepdim=True) > 0), meta=dict(ref.meta))
        return d
