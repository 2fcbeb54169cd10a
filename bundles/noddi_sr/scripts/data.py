"""Datalist loading that lets the configs be parsed (and their properties checked) before the data exist."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["load_datalist", "require_data"]

logger = logging.getLogger(__name__)


def load_datalist(path: str | os.PathLike, key: str, base_dir: str | os.PathLike) -> list[dict]:
    """``load_decathlon_datalist`` when ``path`` exists, otherwise an empty list (``require_data`` fails at run time)."""
    path = Path(path)
    if not path.is_file():
        logger.warning("datalist '%s' not found; no '%s' cases", path, key)
        return []
    try:
        data = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(base_dir))
    except (ValueError, TypeError, AttributeError) as e:  # malformed JSON (JSONDecodeError is a ValueError), missing section
        raise InvalidInputError(
            f"datalist '{path}' cannot be used: {e}; expected a Decathlon-style JSON with a '{key}' list of cases"
        ) from e
    return data


def require_data(data: list, datalist: str | os.PathLike, key: str) -> None:
    """Fail with a clear message before a run starts on an empty list of cases."""
    if not data:
        raise InputNotFoundError(
            f"no '{key}' cases: datalist '{datalist}' is missing or empty. Build a phantom cohort "
            f"(python -m common.data.noddi_phantom <dataset_dir>) or an HCP datalist (common.data.hcp_datalist), "
            f"and pass --dataset_dir"
        )
