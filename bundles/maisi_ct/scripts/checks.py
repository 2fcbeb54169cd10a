"""Up-front checks that only the maisi_ct configs need: the modality, the MAISI label set and the datalist's labels.

Files, outputs and training checkpoints are checked by ``common.bundle`` (``require_file``, ``check_outputs``,
``check_training_outputs``, ``check_checkpoint``; see CONTRIBUTING.md, "Runs, outputs and checkpoints").

Each check raises one of the user-error classes of ``common.utils.errors`` (one ``ERROR:`` line on the
command line, exit status 1) with a message that names the config key or file and says what was expected.
They run in a config's ``initialize`` (or right before the work that needs them), so a bad request fails
before any network is built or any output is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.transforms.maisi import BODY_LABEL
from common.utils.errors import InvalidInputError

__all__ = ["modality_id", "maisi_label_set", "require_label_names"]


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


def require_label_names(label_names: Mapping[Any, str] | None, datalist: str) -> Mapping[Any, str]:
    """The ControlNet stage needs labels: the datalist's top-level ``labels`` ({id: name}) must be present."""
    if not label_names:
        raise InvalidInputError(
            f"datalist '{datalist}' (config key 'datalist') has no top-level 'labels' ({{id: name}}); the ControlNet "
            "stage needs label maps and their names to map them to MAISI ids"
        )
    return label_names

