"""Writing the inference outputs: one 3D NIfTI per output modality, in the input's geometry.

Outputs are named ``<case>_<name>.nii.gz`` (:func:`common.bundle.case_name`: the case's ``id``, else its input
file's stem); inference plans them with :func:`common.bundle.planned_outputs` and refuses existing ones with
:func:`common.bundle.check_outputs` before any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform

from common.bundle import case_name
from common.utils.errors import InvalidInputError

__all__ = ["output_names", "SaveIVANOutputsd"]


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
    raise InvalidInputError(f"config key 'direction' must be 'forward', 'reverse' or 'both', got {direction!r}")


class SaveIVANOutputsd(MapTransform):
    """Write each channel of ``keys[0]`` (``(N, H, W, D)`` after ``Invertd``) as ``<output_dir>/<id>_<name>.nii.gz``.

    Written by :class:`common.transforms.saving.SafeSaveImage` (atomic, an existing file is refused unless
    ``overwrite`` is true) with the tensor's affine (the input's after ``Invertd``), float32, no resampling.
    Every output of a case is checked before the first one is written, so a refusal leaves none of them.
    Adds ``<key>_files`` (the written paths).
    """

    def __init__(
        self, keys, names: Sequence[str], output_dir: str, id_key: str = "id", overwrite: bool = False
    ) -> None:
        super().__init__(keys)
        self.names, self.output_dir, self.id_key, self.overwrite = list(names), output_dir, id_key, bool(overwrite)

    def __call__(self, data: Mapping) -> dict:
        from common.transforms.ivan import FROM_2D_KEY
        from common.transforms.saving import SafeSaveImage
        from common.utils.io import refuse_overwrite

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.names):
                raise ValueError(f"{key} has {img.shape[0]} channels, expected {len(self.names)} ({self.names})")
            case = case_name(d, None, self.id_key, [key])  # the id, else the stem of the file the input came from
            stems = [os.path.join(self.output_dir, f"{case}_{name}") for name in self.names]
            for stem in stems:  # all or none: refuse before the first file of the case is written
                refuse_overwrite(stem + ".nii.gz", self.overwrite)
            # a one-slice 3D input keeps its third axis (MONAI's writer would squeeze it); a 2D input is written 2D
            meta = getattr(img, "meta", {})
            keep_slice = img.shape[-1] == 1 and not meta.get(FROM_2D_KEY, False)
            saver = SafeSaveImage(
                output_dir=self.output_dir, output_ext=".nii.gz", output_dtype=np.float32, resample=False,
                separate_folder=False, print_log=False, overwrite=self.overwrite,
            )
            files = []
            for c, stem in enumerate(stems):
                saver(img[c : c + 1].float(), filename=stem, spatial_shape=tuple(img.shape[1:]) if keep_slice else None)
                files.append(stem + ".nii.gz")
            d[f"{key}_files"] = files
        return d
