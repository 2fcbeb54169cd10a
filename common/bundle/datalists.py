"""Decathlon-style datalists, read one way in every bundle.

A datalist is a JSON object whose lists (``training``, ``validation``, ``test``, ``testing``) hold one
object per case. Policy:

- a datalist that does not exist yet gives ``[]`` (with a warning): a config must parse, and its
  properties be checked, before the data exist (MONAI Label, ``check_properties``, a freshly downloaded
  bundle); :func:`require_cases` / :func:`require_file` as the first items of ``run`` then stop the run
  with one error naming the config key;
- a file that is not JSON, has no such list (unless ``optional``) or holds something else than one
  object per case is refused naming the file and the list;
- every path is joined to ``base_dir`` (default: the JSON's folder), whether the file exists or not, so a
  missing file is later reported with its full path (``monai.data.load_decathlon_datalist`` joins keys
  other than ``image``/``label`` only when the joined file exists);
- a list of plain strings (the Decathlon ``test`` list) is read as ``[{"image": <path>}, ...]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["load_datalist", "datalist_field", "require_cases", "require_file"]

logger = logging.getLogger(__name__)


def _join(base: str, value: Any) -> Any:
    """``base/value`` for a relative path or a list of them (normalised); other values unchanged."""
    if isinstance(value, str) and value:
        return os.path.normpath(os.path.join(base, value))
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return [os.path.normpath(os.path.join(base, v)) for v in value]
    return value


def _read(path: str | os.PathLike) -> dict:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"datalist '{path}' is not a readable JSON file ({e}); expected a Decathlon-style JSON") from e
    if not isinstance(content, dict):
        raise InvalidInputError(
            f"datalist '{path}' holds a JSON {type(content).__name__}; expected an object with lists of cases "
            "('training', 'validation', 'test', 'testing')"
        )
    return content


def load_datalist(
    path: str | os.PathLike | None,
    key: str,
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] | None = None,
    id_key: str = "id",
    optional: bool = False,
) -> list[dict]:
    """The ``key`` list of the datalist ``path``, each case a dict with its paths joined to ``base_dir``.

    Args:
        path: the datalist JSON; ``[]`` (and a warning) while it does not exist.
        key: the list to read (``training``, ``validation``, ``test``, ``testing``).
        base_dir: folder the relative paths are joined to; default the JSON's folder.
        path_keys: the entries that are file paths; ``None``: every string (or list of strings) but ``id_key``.
        id_key: the case name entry (never joined).
        optional: a datalist without ``key`` gives ``[]`` instead of an error.

    Raises:
        InvalidInputError: naming the file and the list.
    """
    if not path or not os.path.isfile(os.fspath(path)):
        logger.warning("datalist '%s' not found: no '%s' cases", path, key)
        return []
    content = _read(path)
    if key not in content:
        if optional:
            return []
        have = sorted(k for k, v in content.items() if isinstance(v, list))
        raise InvalidInputError(
            f"datalist '{path}' has no '{key}' list (its lists: {have}); expected a Decathlon-style JSON with a "
            f"'{key}' list of cases"
        )
    items = content[key]
    if isinstance(items, list) and all(isinstance(it, str) for it in items):
        items = [{"image": it} for it in items]  # the Decathlon 'test' list: one image path per case
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        bad = next((it for it in items if not isinstance(it, dict)), items) if isinstance(items, list) else items
        raise InvalidInputError(
            f"'{key}' of datalist '{path}' must be a list with one object per case "
            f"({{\"{id_key}\": ..., \"image\": \"<file>\", ...}}); found {type(bad).__name__} {str(bad)[:80]}"
        )
    base = os.fspath(base_dir) if base_dir else os.path.dirname(os.path.abspath(os.fspath(path)))

    def is_path(k: str) -> bool:
        return k != id_key and (path_keys is None or k in path_keys)

    return [{k: (_join(base, v) if is_path(k) else v) for k, v in it.items()} for it in items]


def datalist_field(path: str | os.PathLike | None, field: str, default: Any = None) -> Any:
    """A top-level entry of a datalist other than a case list (e.g. ``labels``: ``{id: name}``); ``default``
    while the file does not exist or lacks it."""
    if not path or not os.path.isfile(os.fspath(path)):
        return default
    return _read(path).get(field, default)


def require_file(path: str | os.PathLike | None, key: str = "datalist", what: str = "datalist") -> str:
    """``path`` (config key ``key``) must be an existing file: the first check of a run that reads it."""
    if not path or not os.path.isfile(os.fspath(path)):
        expected = "a Decathlon-style datalist JSON" if what == "datalist" else "an existing file"
        raise InputNotFoundError(f"{what} '{path}' (config key '{key}') does not exist; expected {expected}")
    return os.fspath(path)


def require_cases(
    items: Sequence, datalist: str | os.PathLike | None, split: str, key: str = "datalist", hint: str = ""
) -> Sequence:
    """Stop a run that has nothing to process, naming where the cases were looked for: the datalist of config
    key ``key`` does not exist, or its ``split`` list is empty. ``hint`` says how to make one."""
    if items:
        return items
    tail = f" ({hint})" if hint else ""
    if not datalist or not os.path.isfile(os.fspath(datalist)):
        raise InputNotFoundError(
            f"no '{split}' cases: datalist '{datalist}' (config key '{key}') does not exist; expected a "
            f"Decathlon-style datalist JSON with a '{split}' list{tail}"
        )
    raise InvalidInputError(
        f"no '{split}' cases: the '{split}' list of datalist '{datalist}' (config key '{key}') is empty; "
        f"expected at least one case{tail}"
    )
