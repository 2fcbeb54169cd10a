"""Checks that run before any work: the cases of a datalist, the output folders and the files a run would write.

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

from common.data.dwi import B0_THRESHOLD, GradientTableError, bin_shells, match_shells, read_bvals_bvecs
from common.transforms.validation import check_image_file, describe_source
from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import check_writable_dir

from .outputs import output_stem

__all__ = [
    "check_output_dir",
    "check_cases",
    "case_stem",
    "montage_names",
    "refuse_existing_outputs",
    "refuse_existing_checkpoints",
    "check_resume",
    "MatchGridd",
]

#: what each datalist entry holds, for the error messages
ENTRY_MEANING = {
    "dwi": "the path of the low-resolution 4D DWI series (NIfTI)",
    "bval": "the path of the DWI's FSL bval file",
    "bvec": "the path of the DWI's FSL bvec file",
    "mask": "the path of the LR brain mask (3D NIfTI)",
    "noddi": "the path of the HR reference NODDI maps (4D NIfTI with 3 volumes: NDI, ODI, FWF)",
    "mask_hr": "the path of the HR brain mask (3D NIfTI)",
    "wm": "the path of the HR white-matter mask (3D NIfTI)",
    "gm": "the path of the HR grey-matter mask (3D NIfTI)",
    "lowres_fit": "the path of the low-resolution fit on the HR grid (4D NIfTI with 3 volumes)",
}
_TABLE_KEYS = ("bval", "bvec")


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create the folder of config key ``key`` if needed and check that it can be written (before any work).

    Raises:
        OutputNotWritableError: naming the folder and the key (a file in its place, no permission, a full disk).
    """
    return check_writable_dir(path, f"output folder (config key '{key}')")


def case_stem(case: Mapping, index: int, image_key: str = "dwi", case_key: str = "id") -> str:
    """The stem of the files a case writes: its ``id`` (last path component) or the stem of its DWI file."""
    cid = case.get(case_key)
    if isinstance(cid, str) and cid.strip("/"):
        return os.path.basename(cid.rstrip("/"))
    img = case.get(image_key)
    return output_stem(img) if isinstance(img, (str, os.PathLike)) else f"case_{index:03d}"


def _case_name(case: Any, index: int) -> str:
    if isinstance(case, Mapping):
        cid = case.get("id")
        if isinstance(cid, str) and cid.strip("/"):
            return f"'{os.path.basename(cid.rstrip('/'))}' (#{index})"
        if isinstance(case.get("dwi"), str):
            return f"'{output_stem(case['dwi'])}' (#{index})"
    return f"#{index}"


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
        name = _case_name(case, i)
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


def montage_names(data: Sequence[Mapping], n_montages: int, case_key: str = "id") -> list[str]:
    """The montage files ``NODDIEvaluationHandler`` writes for the first ``n_montages`` cases."""
    out = []
    for i, case in enumerate(list(data)[: max(int(n_montages), 0)]):
        cid = case.get(case_key, f"case_{i:03d}") if isinstance(case, Mapping) else f"case_{i:03d}"
        out.append(f"montage_{os.path.basename(str(cid).rstrip('/'))}.png")
    return out


def refuse_existing_outputs(
    data: Sequence[Mapping],
    output_dir: str | os.PathLike,
    postfixes: Sequence[str],
    overwrite: bool = False,
    extra: Sequence[str] = (),
    image_key: str = "dwi",
    case_key: str = "id",
) -> list[Path]:
    """Every file a run would write in ``output_dir``; refuse existing ones unless ``overwrite``, and refuse two
    cases that would write the same file. Returns the paths."""
    out_dir = Path(output_dir)
    paths: dict[Path, str] = {}
    for i, case in enumerate(data):
        stem = case_stem(case, i, image_key, case_key) if isinstance(case, Mapping) else f"case_{i:03d}"
        for p in postfixes:
            path = out_dir / f"{stem}_{p}.nii.gz"
            if path in paths:
                raise InvalidInputError(
                    f"cases {paths[path]} and {_case_name(case, i)} would both write '{path}'; expected a distinct "
                    f"'{case_key}' (or DWI file name) per case"
                )
            paths[path] = _case_name(case, i)
    for name in extra:
        paths.setdefault(out_dir / name, "")
    if not overwrite:
        for path in paths:
            if path.exists():
                raise OutputExistsError(f"output '{path}' already exists; set 'overwrite' to true to replace it")
    return list(paths)


def refuse_existing_checkpoints(ckpt_dir: str | os.PathLike, stage: str, allowed: bool = False) -> None:
    """Refuse to start a fresh training stage over the checkpoints of an earlier run of that stage.

    ``<stage>.pt`` (best weights), ``checkpoint_<stage>.pt`` (final state) and ``<stage>_checkpoint*.pt`` (interval
    states) in ``ckpt_dir`` would be replaced; ``allowed`` (config ``overwrite`` or ``resume``) lets the run go on.
    """
    if allowed:
        return
    d = Path(ckpt_dir)
    found = [p for p in (d / f"{stage}.pt", d / f"checkpoint_{stage}.pt") if p.exists()]
    found += sorted(d.glob(f"{stage}_checkpoint*.pt")) if d.is_dir() else []
    if found:
        raise OutputExistsError(
            f"checkpoint '{found[0]}' of an earlier '{stage}' run already exists (config key 'ckpt_dir'); "
            "set 'resume' to true to continue that run, or 'overwrite' to true to train from scratch and replace it"
        )


def check_resume(path: str | os.PathLike, sha256: str | None = None, resume: bool = True) -> None:
    """With ``resume``: the checkpoint of config key ``resume_ckpt`` exists and, when ``resume_sha256`` is given, has
    that digest (checked before any handler of the run writes anything; the loader reads it at the start)."""
    if not resume:
        return
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint '{path}' (config key 'resume_ckpt') does not exist; expected the checkpoint to resume from")
    if sha256:
        from common.data.fetch import HashMismatchError, sha256sum

        got = sha256sum(path)
        if got.lower() != str(sha256).lower():
            raise HashMismatchError(f"checkpoint '{path}' has sha256 {got}, expected {sha256} (config key 'resume_sha256')")


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
