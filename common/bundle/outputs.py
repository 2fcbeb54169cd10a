"""Outputs of a run: planned before any work, never written over unless ``overwrite`` is true."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from common.bundle.cases import case_name, describe_case
from common.utils.errors import InvalidInputError, OutputExistsError
from common.utils.io import check_writable_dir

__all__ = ["planned_outputs", "check_outputs"]


def planned_outputs(
    items: Sequence[Mapping],
    output_dir: str | os.PathLike,
    suffixes: Sequence[str],
    ext: str = ".nii.gz",
    id_key: str = "id",
    image_keys: Sequence[str] = ("image",),
) -> dict[Path, str]:
    """``{output file: case}`` for every case of ``items`` and suffix: ``<output_dir>/<case>_<suffix><ext>``
    (:func:`~common.bundle.cases.case_name` names the case). Two cases that would write the same file are
    refused (:class:`InvalidInputError` naming both), before anything is written."""
    out: dict[Path, str] = {}
    for i, item in enumerate(items):
        stem = case_name(item, i, id_key, image_keys)
        who = describe_case(item, i, id_key, image_keys)
        for suffix in suffixes:
            path = Path(output_dir) / f"{stem}_{suffix}{ext}"
            if path in out:
                raise InvalidInputError(
                    f"cases {out[path]} and {who} would both write '{path}'; expected a distinct '{id_key}' per case"
                )
            out[path] = who
    return out


def check_outputs(
    output_dir: str | os.PathLike,
    overwrite: bool,
    planned: Iterable[str | os.PathLike] = (),
    patterns: Sequence[str] = (),
    key: str = "output_dir",
) -> Path:
    """Before any work: the output folder (config key ``key``) can be written, and unless ``overwrite`` none of
    the ``planned`` files exists and nothing in the folder matches ``patterns`` (for outputs whose names are
    only known when a case is loaded, e.g. ``"*_seg.nii.gz"``). Raises :class:`OutputExistsError` naming the
    first file found and the key ``overwrite``."""
    if not overwrite:
        found = [Path(p) for p in planned if Path(p).exists()]
        if not found and patterns and os.path.isdir(output_dir):
            found = sorted({p for pattern in patterns for p in Path(output_dir).rglob(pattern)})
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise OutputExistsError(
                f"output '{found[0]}'{more} already exists in the output folder (config key '{key}'); set "
                "'overwrite' to true to replace it, or choose another output folder"
            )
    return check_writable_dir(output_dir, f"output folder (config key '{key}')")
