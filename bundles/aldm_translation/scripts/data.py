"""What the ALDM workflows read: modality names and the cases of a datalist.

Datalists are read by :func:`common.bundle.load_datalist` (a missing file gives ``[]``; the run's first
item, :func:`common.bundle.require_cases`, then names what is missing). This module adds what the
translation needs, each check raising a :class:`common.utils.errors.UserInputError` naming the file or
config key:

- :func:`normalize_modality`: a modality name as one of the model's ``modalities`` (case-insensitive);
- :func:`single_case_datalist` (inference): one case from ``input_image`` or the ``testing`` list, each
  with its ``source`` and ``targets`` (from the entry, else the command line) and its source file;
- :func:`training_datalist` (training, validation of stage 1): every case has a file for every modality.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from common.bundle import load_datalist
from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["normalize_modality", "single_case_datalist", "training_datalist", "describe_entry"]


def normalize_modality(name: Any, modalities: Sequence[str], where: str) -> str:
    """``name`` as one of ``modalities`` (case-insensitive: ``"T1ce"`` is ``"t1ce"``), or an
    :class:`InvalidInputError` naming ``where`` (e.g. ``"config key 'targets'"``) and the known names."""
    known = {str(m).lower(): str(m) for m in modalities}
    value = str(name).strip()
    if value.lower() not in known:
        raise InvalidInputError(
            f"unknown modality {value!r} in {where}; expected one of {list(modalities)} "
            "(the contrasts this model was trained on, config key 'modalities')"
        )
    return known[value.lower()]


def _split_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        return [str(t).strip() for t in value]
    raise InvalidInputError(f"expected a modality name or a list of names, got {type(value).__name__} {value!r}")


def describe_entry(i: int, entry: dict, split: str, datalist: str) -> str:
    """How a message names entry ``i`` of a datalist list: ``entry 3 (id 'c1') of 'testing' in datalist '...'``."""
    who = f"entry {i}" + (f" (id '{entry['id']}')" if entry.get("id") is not None else "")
    return f"{who} of '{split}' in datalist '{datalist}'"


#: entries of an inference case that name modalities, not files
_NOT_PATHS = ("source", "targets")


def single_case_datalist(
    input_image: str | None,
    source: str,
    targets: Sequence[str] | str,
    datalist: str | None,
    dataset_dir: str,
    modalities: Sequence[str] | None = None,
) -> list[dict]:
    """Inference items: one case from the command line, or ``testing`` of a datalist JSON.

    A datalist entry is ``{"image": ..., "source": "t1", "targets": ["t2", "flair"]}``; entries
    without ``source``/``targets`` get the command-line values. Instead of ``image`` an entry may
    give the source file under the source's name (``{"id": ..., "t1": ..., "t2": ...}``). Every entry
    but ``id``, ``source`` and ``targets`` is a file, joined to ``dataset_dir``.

    With ``modalities``, every source and target name must be one of them (case-insensitive, so
    ``T1ce`` is ``t1ce``); an unknown name, an empty target list, an entry without its source
    image or a source file that does not exist raises a user error naming the key or entry.
    """
    check = (lambda n, key: normalize_modality(n, modalities, key)) if modalities else (lambda n, key: str(n))
    if input_image:
        items = [{"image": str(input_image)}]
        where = ["config key 'input_image'"]
    else:
        # read as written first: which entries are files is only known from the entries themselves
        items = load_datalist(datalist, "testing", dataset_dir, path_keys=())
        if not items:
            return []  # nothing to do: `require_cases` at the start of `run` says what is missing
        paths = sorted({k for it in items for k in it} - set(_NOT_PATHS))
        items = load_datalist(datalist, "testing", dataset_dir, path_keys=paths)
        where = [describe_entry(i, it, "testing", datalist) for i, it in enumerate(items)]
    out = []
    for it, w in zip(items, where):
        # where a name came from: the entry itself, else the command line / config
        src_from = f"'source' of {w}" if "source" in it else "config key 'source'"
        tgt_from = f"'targets' of {w}" if "targets" in it else "config key 'targets'"
        src = check(it.get("source", source), src_from)
        tgts = [check(t, tgt_from) for t in _split_names(it.get("targets", targets))]
        if not tgts:
            raise InvalidInputError(f"no target modality in {tgt_from}; expected one or more of {list(modalities or [])}")
        image = it.get("image")
        if not image:
            # the source contrast under its own name, matched case-insensitively
            image = next((v for k, v in it.items() if str(k).lower() == src.lower() and isinstance(v, str)), None)
        if not image:
            raise InvalidInputError(
                f"{w} has no source image: expected the '{src}' file (the requested source contrast) "
                f"under 'image' or '{src}'; it has {sorted(k for k in it if k not in _NOT_PATHS)}"
            )
        if not os.path.exists(image):
            raise InputNotFoundError(f"input file '{image}' ({w}) does not exist")
        out.append({**{k: v for k, v in it.items() if k not in _NOT_PATHS}, "image": image, "source": src, "targets": tgts})
    return out


def training_datalist(
    datalist: str, modalities: Sequence[str], dataset_dir: str, split: str = "training", optional: bool = False
) -> list[dict]:
    """Cases of ``split`` for training, each with a file for every modality of ``modalities``.

    Returns ``[]`` when ``datalist`` does not exist (the run then stops in
    :func:`common.bundle.require_cases`) and, with ``optional``, when the split is absent. A case without
    one of the modalities raises :class:`InvalidInputError` naming the datalist, the case and the missing
    modality.
    """
    items = load_datalist(datalist, split, dataset_dir, path_keys=[*modalities, "image", "label", "mask"], optional=optional)
    for i, it in enumerate(items):
        missing = [m for m in modalities if not it.get(m)]
        if missing:
            raise InvalidInputError(
                f"{describe_entry(i, it, split, datalist)} has no {missing} image (missing modality); every case needs "
                f"a file for each of {list(modalities)} (config key 'modalities'); it has {sorted(it)}"
            )
    return items
