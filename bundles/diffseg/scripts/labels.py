"""Label maps of another class set: merge their values into the bundle's classes before evaluation."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = ["RemapLabelsd", "parse_label_mapping"]


def parse_label_mapping(mapping: Mapping | str | None, key: str = "label_mapping") -> dict[int, list[int]] | None:
    """``{bundle class: [values of the other class set], ...}`` from a dict or a JSON file's path.

    Keys are the bundle's class indices (1 ... C-1; strings allowed, as JSON writes them), values
    one value or a list of values of the other label map. ``None`` or an empty mapping: no remapping.
    """
    if mapping is None or (isinstance(mapping, (str, Mapping)) and not mapping):
        return None
    source = f"config key '{key}'"
    if isinstance(mapping, (str, Path)):
        path = Path(mapping)
        if not path.is_file():
            raise InputNotFoundError(f"label mapping file '{path}' ({source}) does not exist; expected a JSON object "
                                     "{\"<class>\": [<values of the other label map>], ...}")
        try:
            mapping = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"label mapping file '{path}' ({source}) is not valid JSON: {e}") from e
        source = f"label mapping file '{path}' ({source})"
    if not isinstance(mapping, Mapping):
        raise InvalidInputError(f"{source} holds a {type(mapping).__name__}; expected an object "
                                "{\"<class>\": [<values of the other label map>], ...}")
    out: dict[int, list[int]] = {}
    seen: dict[int, int] = {}
    try:
        for cls, values in mapping.items():
            c = int(cls)
            vals = [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
            if c < 0 or any(v < 0 for v in vals):
                raise InvalidInputError(f"{source} has a negative class or value ({cls}: {values}); expected labels >= 0")
            for v in vals:
                if v in seen and seen[v] != c:
                    raise InvalidInputError(f"{source} maps value {v} to both class {seen[v]} and class {c}")
                seen[v] = c
            out[c] = vals
    except (TypeError, ValueError) as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"{source} has a non-integer class or value ({e}); expected integers") from e
    return out


class RemapLabelsd(MapTransform):
    """Merge the values of a label map of another class set into the bundle's classes.

    ``mapping`` (see :func:`parse_label_mapping`) names, for each bundle class, the values of the
    other label map that make it up; every value not named becomes background (0). E.g. the
    TotalSegmentator label map of the demo CT becomes the demo's 7 classes with
    ``{"1": [5], "2": [1], "3": [2, 3], ...}`` (``common.data.demo.CT_CLASS_MERGE``). ``None``:
    the labels pass unchanged. Shapes and metadata are kept; the dtype stays integer-valued.
    """

    def __init__(self, keys: KeysCollection, mapping: Mapping | str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapping = parse_label_mapping(mapping)
        if self.mapping is not None:
            size = max(max(v) for v in self.mapping.values() if v) + 1 if any(self.mapping.values()) else 1
            self.lut = np.zeros(max(size, 1), dtype=np.int64)
            for cls, values in self.mapping.items():
                self.lut[values] = cls

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.mapping is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            arr = torch.as_tensor(img).detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            values = np.rint(arr).astype(np.int64)
            inside = (values >= 0) & (values < len(self.lut))
            mapped = np.where(inside, self.lut[np.clip(values, 0, len(self.lut) - 1)], 0)
            if isinstance(img, torch.Tensor):
                out = img.clone() if hasattr(img, "meta") else torch.as_tensor(img).clone()
                out[...] = torch.as_tensor(mapped, dtype=out.dtype)
                d[key] = out
            else:
                d[key] = mapped.astype(arr.dtype)
        return d
