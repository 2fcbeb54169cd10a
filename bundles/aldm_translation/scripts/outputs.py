"""What the ALDM bundle writes: one file per case and translation direction.

A case translated from ``<source>`` into ``<target>`` writes ``<case>_<source>2<target><ext>``
(``<case>``: :func:`common.bundle.case_name`). :func:`translation_outputs` plans every such file of a
run, so that :func:`common.bundle.check_outputs` refuses existing outputs before any work;
:class:`SaveTranslationsd` writes the translations of inference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.bundle import case_name, describe_case, planned_outputs
from common.transforms.saving import SafeSaveImage
from common.utils.errors import InvalidInputError
from common.utils.io import refuse_overwrite

from .inferer import per_sample_targets

__all__ = ["translation_outputs", "SaveTranslationsd"]


def translation_outputs(items: Sequence[Mapping], output_dir: str | os.PathLike, ext: str = ".nii.gz") -> dict[Path, str]:
    """``{file: case}``: ``<output_dir>/<case>_<source>2<target><ext>`` for every target of every item
    (``{"id"?, "image", "source", "targets"}``). Each case has its own directions, so the files are planned
    case by case (:func:`common.bundle.planned_outputs`); two cases that would write the same file are
    refused naming both."""
    planned: dict[Path, str] = {}
    for i, item in enumerate(items):
        who = describe_case(item, i)
        suffixes = [f"{item['source']}2{t}" for t in item["targets"]]
        for path in planned_outputs([item], output_dir, suffixes, ext=ext):
            if path in planned:
                raise InvalidInputError(f"cases {planned[path]} and {who} would both write '{path}'; expected a distinct 'id' per case")
            planned[path] = who
    return planned


class SaveTranslationsd(MapTransform):
    """Write channel ``k`` of ``data[key]`` as ``<case>_<source>2<target_k>.nii.gz`` in ``output_dir``.

    ``data[key]`` must carry the input geometry (a ``MetaTensor`` after ``Invertd``). ``<case>`` is
    :func:`common.bundle.case_name` of ``data["id"]``, else of the source file. Existing files are
    refused (naming the file and the key ``overwrite``) unless ``overwrite`` is true; each file is
    written under a temporary name and renamed into place
    (:class:`common.transforms.SafeSaveImage`). The written paths are stored in ``data["saved_files"]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        source_key: str = "source",
        targets_key: str = "targets",
        overwrite: bool = False,
        output_dtype: Any = "float32",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = str(output_dir)
        self.source_key = source_key
        self.targets_key = targets_key
        self.overwrite = overwrite
        self.output_dtype = output_dtype

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        source = d[self.source_key]
        source = source[0] if isinstance(source, (list, tuple)) else source
        targets = per_sample_targets(d[self.targets_key], 1)[0]
        planned = []
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(targets):
                raise ValueError(f"'{key}' has {img.shape[0]} channels for {len(targets)} targets {targets}")
            if not isinstance(img, MetaTensor):
                raise TypeError("the prediction must be a MetaTensor with the input geometry (run Invertd first)")
            case = case_name({"id": d.get("id"), "source_image": img}, image_keys=("source_image",))
            for k, tgt in enumerate(targets):
                path = os.path.join(self.output_dir, f"{case}_{source}2{tgt}.nii.gz")
                refuse_overwrite(path, self.overwrite)  # every target checked before the first is written
                planned.append((img, k, path))
        saved = []
        for img, k, path in planned:
            out = img[k : k + 1]
            out.meta["filename_or_obj"] = path
            writer = SafeSaveImage(
                output_dir=self.output_dir,
                output_postfix="",
                output_ext=".nii.gz",
                output_dtype=self.output_dtype,
                resample=False,
                separate_folder=False,
                print_log=False,
                overwrite=self.overwrite,
                output_name_formatter=lambda meta, saver, p=path: {"subject": os.path.basename(p)[: -len(".nii.gz")], "idx": None},
            )
            writer(out)
            saved.append(path)
        d["saved_files"] = saved
        return d
