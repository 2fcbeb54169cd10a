"""Writing the inference outputs: one 3D NIfTI per output modality, in the input's geometry."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform

from common.utils.errors import InvalidInputError

__all__ = ["output_names", "case_id", "output_files", "check_outputs", "SaveIVANOutputsd"]


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
            case = case_id(d, img, self.id_key)
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


def case_id(d: Mapping, img=None, id_key: str = "id") -> str:
    """The case name: the datalist ``id`` (its last path part: ``load_decathlon_datalist`` joins ``base_dir`` to
    any value that names an existing path, e.g. an id equal to the case folder), else the input file stem."""
    case = d.get(id_key)
    if case is None:
        meta = getattr(img, "meta", {}) if img is not None else {}
        return os.path.basename(str(meta.get("filename_or_obj", "case"))).split(".")[0]
    return os.path.basename(str(case).rstrip("/\\"))


def output_files(
    items: Sequence[Mapping], names: Sequence[str], output_dir: str, ref_key: str, id_key: str = "id"
) -> dict[str, str]:
    """``{output file: case}`` that inference will write for the datalist ``items`` (same naming as
    :class:`SaveIVANOutputsd`: the case id, else the stem of the ``ref_key`` file)."""
    out: dict[str, str] = {}
    for i, it in enumerate(items):
        if it.get(id_key) is not None:
            case = os.path.basename(str(it[id_key]).rstrip("/\\"))
        else:
            ref = it.get(ref_key)
            ref = ref[0] if isinstance(ref, list) and ref else ref
            case = os.path.basename(str(ref)).split(".")[0]
        for name in names:
            path = os.path.join(output_dir, f"{case}_{name}.nii.gz")
            if path in out:
                raise InvalidInputError(
                    f"two cases of the datalist ('{out[path]}' and '{case}', #{i}) would both write '{path}'; "
                    f"expected a distinct '{id_key}' per case"
                )
            out[path] = case
    return out


def check_outputs(
    items: Sequence[Mapping], names: Sequence[str], output_dir: str, ref_key: str, overwrite: bool = False,
    id_key: str = "id",
) -> None:
    """Before any work: the output folder can be written and, unless ``overwrite``, none of the outputs
    exists yet (:class:`~common.utils.errors.OutputExistsError` naming the first one and the key ``overwrite``)."""
    from common.utils.io import check_writable_dir, refuse_overwrite

    files = output_files(items, names, output_dir, ref_key, id_key)
    check_writable_dir(output_dir, "output folder (output_dir)")
    for path in files:
        refuse_overwrite(path, overwrite)
