"""Case names: what a case's output files are called and how a message names a case."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "file_stem", "case_name", "describe_case"]

#: extensions stripped from a file name to give its stem (longest first: ``.nii.gz`` before ``.gz``)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".npz", ".npy", ".gz")

#: file names that say what a file is, not which case: ``<case>/image.nii.gz`` is named after its folder
_GENERIC_STEMS = ("image", "label")


def file_stem(path: str | os.PathLike) -> str:
    """``path``'s file name without its image extension; a generic name (``image``, ``label``) in a
    case folder (``<case>/image.nii.gz``, the layout of the demo cohorts) gives the folder's name."""
    p = os.fspath(path).rstrip("/\\")
    name = os.path.basename(p)
    stem = next((name[: -len(e)] for e in IMAGE_EXTENSIONS if name.lower().endswith(e)), os.path.splitext(name)[0])
    parent = os.path.basename(os.path.dirname(p))
    return parent if stem.lower() in _GENERIC_STEMS and parent else stem


def _source_path(value: Any) -> str | None:
    """The file a datalist value or a loaded image (``MetaTensor``) came from."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) or None
    meta = getattr(value, "meta", None)
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)) and name:
        name = name[0]
    return str(name) if name else None


def case_name(
    item: Mapping | str | os.PathLike,
    index: int | None = None,
    id_key: str = "id",
    image_keys: Sequence[str] = ("image",),
) -> str:
    """The stem every output of a case carries: the last path part of its ``id``; else the stem of the first
    of ``image_keys`` it has (a path, or a loaded image whose meta data names its file); else
    ``case_<index>`` (``case`` without an index). A path is named by its stem."""
    if not isinstance(item, Mapping):
        return file_stem(item)
    cid = item.get(id_key)
    if cid is not None and str(cid).strip("/\\"):
        return os.path.basename(str(cid).rstrip("/\\"))
    for key in image_keys:
        path = _source_path(item.get(key))
        if path:
            return file_stem(path)
    return f"case_{index:03d}" if index is not None else "case"


def describe_case(item: Any, index: int, id_key: str = "id", image_keys: Sequence[str] = ("image",)) -> str:
    """How a message names a case: ``'<name>' (#<index>)``, or ``#<index>`` when it has no name."""
    if isinstance(item, Mapping):
        name = case_name(item, None, id_key, image_keys)
        if name != "case":
            return f"'{name}' (#{index})"
    return f"#{index}"
