"""Up-front checks of the maisi_ct configs: config keys, input files and output locations.

Each check raises one of the user-error classes of ``common.utils.errors`` (one ``ERROR:`` line on the
command line, exit status 1) with a message that names the config key or file and says what was expected.
They run in a config's ``initialize`` (or right before the work that needs them), so a bad request fails
before any network is built or any output is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.transforms.maisi import BODY_LABEL
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import check_writable_dir, refuse_overwrite

__all__ = [
    "modality_id",
    "maisi_label_set",
    "require_file",
    "check_output_dir",
    "refuse_existing",
    "check_training_outputs",
    "require_label_names",
]


def modality_id(modality: str | int, mapping_file: str | os.PathLike, key: str = "modality") -> int:
    """The class label of ``modality`` (a name of ``modality_mapping.json``, e.g. ``"ct"``, or one of its ids)."""
    mapping = {str(k): int(v) for k, v in json.loads(Path(mapping_file).read_text()).items()}
    if isinstance(modality, str) and modality.strip().lower() in mapping:
        return mapping[modality.strip().lower()]
    if isinstance(modality, int) and not isinstance(modality, bool) and modality in mapping.values():
        return int(modality)
    raise InvalidInputError(
        f"config key '{key}' is {modality!r}, not a modality of {Path(mapping_file).name}; expected one of "
        f"{sorted(mapping)} (or its id)"
    )


def maisi_label_set(label_dict_file: str | os.PathLike) -> list[int]:
    """Every valid value of a MAISI label map: 0 (outside the body), the ids of ``label_dict.json`` and body 200."""
    ids = {int(v) for v in json.loads(Path(label_dict_file).read_text()).values()}
    return sorted(ids | {0, BODY_LABEL})


def require_file(path: str | os.PathLike | None, key: str, what: str = "file") -> str:
    """``path`` (config key ``key``) must be an existing file."""
    if not path or not Path(path).is_file():
        raise InputNotFoundError(f"{what} '{path}' (config key '{key}') does not exist")
    return str(path)


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create ``path`` if needed and check it can be written, naming the config key if not."""
    return check_writable_dir(path, f"output folder (config key '{key}')")


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, key: str = "overwrite") -> None:
    """Refuse (``OutputExistsError`` naming the first file and the key ``overwrite``) outputs that already exist."""
    for p in paths:
        refuse_overwrite(p, bool(overwrite), key)


def check_training_outputs(output_dir: str, ckpt_dir: str, final_checkpoint: str, resume: bool, overwrite: bool) -> None:
    """Before training: both folders writable, and the final checkpoint of an earlier run is not replaced silently.

    Resuming (``resume``) continues that run and replaces its checkpoint by design; otherwise an existing
    ``<ckpt_dir>/<final_checkpoint>`` is refused unless ``overwrite``.
    """
    check_output_dir(output_dir, "output_dir")
    check_output_dir(ckpt_dir, "ckpt_dir")
    if not resume:
        refuse_existing([Path(ckpt_dir) / final_checkpoint], overwrite)


def require_label_names(label_names: Mapping[Any, str] | None, datalist: str) -> Mapping[Any, str]:
    """The ControlNet stage needs labels: the datalist's top-level ``labels`` ({id: name}) must be present."""
    if not label_names:
        raise InvalidInputError(
            f"datalist '{datalist}' (config key 'datalist') has no top-level 'labels' ({{id: name}}); the ControlNet "
            "stage needs label maps and their names to map them to MAISI ids"
        )
    return label_names

