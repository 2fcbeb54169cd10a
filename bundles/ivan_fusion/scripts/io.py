"""Writing the inference outputs: one 3D NIfTI per output modality, in the input's geometry."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform

__all__ = ["output_names", "case_id", "SaveIVANOutputsd"]


def output_names(task: str, inputs: Sequence[str], targets: Sequence[str], direction: str) -> list[str]:
    """File suffixes of the output channels, in channel order.

    ``forward``: ``<task>`` (one target) or ``<task>_<modality>`` (several); ``reverse``: ``rev_<modality>`` per
    source; ``both``: the forward names then the reverse ones.
    """
    fwd = [task] if len(targets) == 1 else [f"{task}_{m}" for m in targets]
    rev = [f"rev_{m}" for m in inputs]
    if direction == "forward":
        return fwd
    if direction == "reverse":
        return rev
    if direction == "both":
        return fwd + rev
    raise ValueError(f"direction must be forward, reverse or both, got {direction!r}")


class SaveIVANOutputsd(MapTransform):
    """Write each channel of ``keys[0]`` (``(N, H, W, D)`` after ``Invertd``) as ``<output_dir>/<id>_<name>.nii.gz``.

    Written by :class:`common.transforms.saving.SafeSaveImage` (atomic, an existing file is refused unless
    ``overwrite`` is true) with the tensor's affine (the input's after ``Invertd``), float32, no resampling.
    Adds ``<key>_files`` (the written paths).
    """

    def __init__(
        self, keys, names: Sequence[str], output_dir: str, id_key: str = "id", overwrite: bool = False
    ) -> None:
        super().__init__(keys)
        self.names, self.output_dir, self.id_key, self.overwrite = list(names), output_dir, id_key, bool(overwrite)

    def __call__(self, data: Mapping) -> dict:
        from common.transforms.saving import SafeSaveImage

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.names):
                raise ValueError(f"{key} has {img.shape[0]} channels, expected {len(self.names)} ({self.names})")
            case = case_id(d, img, self.id_key)
            saver = SafeSaveImage(
                output_dir=self.output_dir, output_ext=".nii.gz", output_dtype=np.float32, resample=False,
                separate_folder=False, print_log=False, overwrite=self.overwrite,
            )
            files = []
            for c, name in enumerate(self.names):
                stem = os.path.join(self.output_dir, f"{case}_{name}")
                saver(img[c : c + 1].float(), filename=stem)
                files.append(stem + ".nii.gz")
            d[f"{key}_files"] = files
        return d


def case_id(d: Mapping, img=None, id_key: str = "id") -> str:
    """The case name: the datalist ``id`` (its last path part: ``load_decathlon_datalist`` joins ``base_dir`` to
    any value that names an existing path, e.g. an id equal to the case folder), else the input file stem."""
    case = d.get(id_key)
    if case is None:
        meta = getattr(img, "meta", {}) if img is not None else {}
        return os.path.basename(str(meta.get("filename_or_obj", "case"))).split(".")[0]
    return os.path.basename(str(case).rstrip("/\\"))
