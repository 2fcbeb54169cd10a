"""Output-file safety of the inference and evaluation configs."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import MapTransform

from common.utils.io import refuse_overwrite

__all__ = ["output_stem", "RefuseExistingOutputsd"]


def output_stem(filename: str) -> str:
    """``<dir>/case.nii.gz`` → ``case`` (the stem ``SaveImaged`` uses)."""
    name = os.path.basename(str(filename))
    for ext in (".nii.gz", ".nii", ".gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


class RefuseExistingOutputsd(MapTransform):
    """Raise before anything is written when an output of this case exists and ``overwrite`` is false.

    The names are those ``SaveImaged(output_dir, output_postfix=p, separate_folder=False)`` will use:
    ``<output_dir>/<stem>_<p>.nii.gz`` for every postfix, with the stem of the case id (``case_key``) or of the
    input file (as :class:`common.transforms.dwi.HRMapsd` names the maps). Placed in the preprocessing, it fails
    before any sampling is spent.
    """

    def __init__(self, keys: str, output_dir: str, postfixes: Sequence[str], overwrite: bool = False, case_key: str = "id") -> None:
        super().__init__(keys)
        self.output_dir, self.postfixes, self.overwrite = Path(output_dir), list(postfixes), bool(overwrite)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case = d.get(self.case_key)
            if isinstance(case, str):
                stem = os.path.basename(case.rstrip("/"))
            else:
                stem = output_stem(d[key].meta.get("filename_or_obj", key))
            for p in self.postfixes:
                refuse_overwrite(self.output_dir / f"{stem}_{p}.nii.gz", self.overwrite)
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
