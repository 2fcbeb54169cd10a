"""NODDI checks that run before any work: the entries, images and gradient tables of every case of a datalist.

Output folders, the files a run would write and training checkpoints are checked by :mod:`common.bundle`
(``check_outputs``, ``check_training_outputs``, ``check_checkpoint``); a case is named as there (``describe_case``).

Every error is one of the user-error classes of :mod:`common.utils.errors` (``GradientTableError`` for the
gradient tables) and names the file or config key and what was expected, so on the command line a bad input ends
with one ``ERROR: ...`` line, before a network is built or any output is written.

Voxel-level problems (dimensionality, NaN/Inf, all-zero volumes) are found when a case is loaded, by
``common.transforms.ValidateImaged`` and :class:`MatchGridd` in the configs' preprocessing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.bundle import describe_case
from common.data.dwi import B0_THRESHOLD, GradientTableError, bin_shells, match_shells, read_bvals_bvecs
from common.transforms.validation import check_image_file, describe_source
from common.utils.errors import InputNotFoundError, InvalidInputError

from .data import ENTRY_MEANING

__all__ = ["check_cases", "MatchGridd"]

_TABLE_KEYS = ("bval", "bvec")


def check_cases(
    data: Sequence[Mapping],
    source: str = "config key 'data'",
    required: Sequence[str] = ("dwi", "bval", "bvec"),
    optional: Sequence[str] = ("mask",),
    shells: Sequence[float] | None = None,
    shell_tolerance: float = 100.0,
    min_directions: int = 6,
    b0_threshold: float = B0_THRESHOLD,
    shells_key: str | None = "shells",
) -> None:
    """Check every case of ``data`` (the cases of ``source``, e.g. "config key 'data'") before anything is loaded or written.

    Per case: the ``required`` entries are present; every image file (``required`` and present ``optional``
    entries other than the gradient files) exists and has a plausible NIfTI header; the bval/bvec pair is readable,
    lists one b-value and one unit vector per DWI volume, has a b0 volume (b ≤ ``b0_threshold``) to normalise the
    signal with, and has the ``shells`` the model was trained with (config key ``shells_key``: a missing shell is refused,
    naming the key and how to opt into fewer features, never silently dropped). Reads headers and text files only.

    Raises:
        InvalidInputError, InputNotFoundError, GradientTableError: naming the case, the file or the entry.
    """
    import nibabel as nib

    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise InvalidInputError(f"{source} must be a list of cases (dicts), got {type(data).__name__}")
    for i, case in enumerate(data):
        name = describe_case(case, i, image_keys=("dwi",))
        if not isinstance(case, Mapping):
            raise InvalidInputError(
                f"case {name} of {source} is a {type(case).__name__}; expected a dict with the entries {list(required)}"
            )
        for k in required:
            if not isinstance(case.get(k), (str, os.PathLike)):
                what = ENTRY_MEANING.get(k, "a file path")
                got = "no" if k not in case else f"a {type(case[k]).__name__} as"
                raise InvalidInputError(f"case {name} of {source} has {got} '{k}' entry; expected {what}")
        for k in list(required) + [k for k in optional if isinstance(case.get(k), (str, os.PathLike))]:
            if k in _TABLE_KEYS:
                if not Path(case[k]).is_file():
                    raise InputNotFoundError(f"{k} file '{case[k]}' (key '{k}' of case {name}) does not exist")
            else:
                check_image_file(case[k], key=k)
        if not all(k in required for k in ("dwi", *_TABLE_KEYS)):
            continue
        dwi, bval, bvec = (case[k] for k in ("dwi", *_TABLE_KEYS))
        try:
            shape = nib.load(os.fspath(dwi)).shape
        except Exception as e:  # the header passed check_image_file; anything else nibabel refuses
            raise InvalidInputError(
                f"input file '{dwi}' (key 'dwi') cannot be read as a NIfTI image: {e}; expected a 4D NIfTI series "
                "with FSL bval/bvec files (convert NRRD or DICOM diffusion series with e.g. dcm2niix or DWIConvert)"
            ) from e
        where = f"input file '{dwi}' (key 'dwi', case {name} of {source})"
        # the same refusals as ValidateImaged's when the series loads, found before the first case is written
        if len(shape) == 3:
            raise InvalidInputError(
                f"{where} is a 3D image (one volume, header shape {tuple(shape)}); expected a 4D diffusion-weighted "
                "series with one volume per gradient direction along the 4th axis"
            )
        if len(shape) == 4 and 1 in shape[:3]:
            raise InvalidInputError(
                f"{where} has spatial shape {tuple(shape[:3])}: a single slice (a 2D image) along axis "
                f"{list(shape[:3]).index(1)}; expected a 3D volume per gradient direction"
            )
        table = read_bvals_bvecs(bval, bvec, b0_threshold=b0_threshold)
        if len(shape) != 4:
            continue  # a 2D or 5D+ DWI: refused with its shape when loaded (ValidateImaged)
        if len(table) != shape[3]:
            raise GradientTableError(
                f"DWI series '{dwi}' has {shape[3]} volumes but bval file '{bval}' lists {len(table)} b-values "
                f"(and bvec file '{bvec}' {len(table)} vectors); expected one b-value and one gradient direction per volume"
            )
        if not np.any(table.b0_mask):
            raise GradientTableError(
                f"bval file '{bval}' has no b0 volume (b ≤ {b0_threshold:g} s/mm²; smallest b-value "
                f"{float(table.bvals.min()):g}); expected at least one b0 volume to normalise the DWI series '{dwi}' with"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropped or extra shells: DWIFeaturesd warns when the case is loaded
            match_shells(
                bin_shells(table.bvals, tolerance=shell_tolerance, b0_threshold=b0_threshold),
                shells,
                tolerance=shell_tolerance,
                min_directions=min_directions,
                source=f"bval file '{bval}' (key 'bval' of case {name})",
                key=shells_key,
            )


def _spatial(img: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in img.shape[1:])


class MatchGridd(MapTransform):
    """Images that must lie on the grid of ``ref_key`` (channel-first, after loading and ``ValidateImaged``).

    ``scale`` 1: same spatial shape and (within ``atol`` mm) the same affine, e.g. an LR mask and its DWI;
    ``scale`` s: spatial shape s × the reference's, e.g. the HR maps and masks of an LR DWI. With ``nonempty`` an
    image without any nonzero voxel (an empty mask, an all-zero reference) is refused too.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "dwi",
        scale: int = 1,
        nonempty: bool = False,
        atol: float = 1e-2,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.scale, self.nonempty, self.atol = ref_key, int(scale), bool(nonempty), float(atol)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        ref_where = describe_source(ref, self.ref_key)
        want = tuple(s * self.scale for s in _spatial(ref))
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, (str, bytes)):
                continue
            where = describe_source(img, key)
            got = _spatial(img)
            grid = "grid" if self.scale == 1 else f"×{self.scale} grid"
            if got != want:
                raise InvalidInputError(
                    f"{where} has spatial shape {got}, but {ref_where} has {_spatial(ref)}; expected {want} "
                    f"(the {grid} of the {self.ref_key} image)"
                )
            if self.scale == 1 and hasattr(img, "affine") and hasattr(ref, "affine"):
                a, b = np.asarray(img.affine, dtype=np.float64), np.asarray(ref.affine, dtype=np.float64)
                if not np.allclose(a, b, rtol=0, atol=self.atol):
                    raise InvalidInputError(
                        f"{where} has another affine than {ref_where} (largest difference {float(np.abs(a - b).max()):.3g} mm); "
                        f"expected an image on the grid of the {self.ref_key} image"
                    )
            if self.nonempty and not bool(torch.as_tensor(img).ne(0).any()):
                raise InvalidInputError(f"{where} is all-zero (no foreground voxel); expected a non-empty image")
        return d
