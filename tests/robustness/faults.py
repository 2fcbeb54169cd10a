"""Bad inputs made from a good real image, the way user data breaks, and the checks that a run
failed cleanly: one clear error naming the file or key, nothing half-written, nothing overwritten.

Used by every ``tests/robustness/test_<bundle>.py``. Each bundle test lists the kinds it tries in a
module-level ``KINDS`` tuple (``kinds_tried``: all but those that do not apply to the bundle);
``tests/robustness/test_coverage.py`` counts them for the README. The shared set-up of those tests is here too:
the user errors, ``write_datalist`` and ``expect_refused`` (one user error, nothing written).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.fetch import HashMismatchError
from common.utils.errors import (
    InputNotFoundError,
    InvalidInputError,
    OutputExistsError,
    OutputNotWritableError,
    find_user_error,
)
from common.utils.io import CheckpointError

#: the user errors a refused run raises, importable from here with the fault makers
USER_ERRORS = (CheckpointError, HashMismatchError, InputNotFoundError, InvalidInputError, OutputExistsError,
               OutputNotWritableError)

#: the bad-input kinds of the issue, with the names the bundle tests use in ``KINDS``
ALL_KINDS = {
    "missing_file": "a missing input file",
    "truncated_gzip": "a truncated .nii.gz (download cut short)",
    "corrupt_header": "a NIfTI with a corrupt header",
    "two_d": "a 2D image where a 3D volume is expected",
    "four_d": "a 4D series where a 3D volume is expected",
    "three_d_dwi": "a single 3D volume where a 4D DWI series is expected",
    "wrong_channels": "a wrong channel count or a missing modality",
    "unknown_modality": "an unknown modality name",
    "nan": "NaN voxels",
    "inf": "Inf voxels",
    "all_zero": "an all-zero volume",
    "extreme_intensity": "extreme intensities",
    "oblique_anisotropic": "an oblique, anisotropic affine (must work, output in the input's geometry)",
    "too_small": "a volume smaller than the network's minimum size (padded or refused)",
    "bval_bvec_mismatch": "bval/bvec files that do not match the DWI",
    "labels_outside_set": "label values outside the class set",
    "no_overlap": "inputs of one case that do not overlap in physical space",
    "foreign_checkpoint": "a checkpoint of another bundle",
    "wrong_task_checkpoint": "a checkpoint of this bundle trained for another task",
    "mismatched_checkpoint": "a checkpoint with mismatched shapes (another configuration)",
    "hash_mismatch": "a checkpoint or downloaded file whose hash does not match",
    "unwritable_output": "an output folder that cannot be written",
    "existing_output": "an existing output (refused unless overwrite is set)",
    # held-out style: formats and framings users have that the demo data never used (must work, or one clear refusal)
    "nrrd": "the image as NRRD (must work, output in the input's geometry)",
    "dicom_series": "the image as a DICOM series folder, one file per slice (must work, output in the input's geometry)",
    "single_slice": "a single-slice volume (works where the network allows, otherwise one clear refusal)",
    "clinical_7mm": "a clinical-like series with 7 mm slices (must work, output in the input's geometry)",
    "multi_case_bad_last": "a multi-case run whose last case is bad (refused before the first output)",
}

#: the held-out-style kinds of ``ALL_KINDS``, made by :func:`make_held_out_input`
HELD_OUT_KINDS = ("nrrd", "dicom_series", "single_slice", "clinical_7mm")


def kinds_tried(*not_applicable: str) -> tuple[str, ...]:
    """A bundle test's ``KINDS``: every kind of ``ALL_KINDS`` (in its order) but the ``not_applicable`` ones."""
    unknown = set(not_applicable) - set(ALL_KINDS)
    assert not unknown, f"unknown kinds {sorted(unknown)}"
    return tuple(k for k in ALL_KINDS if k not in not_applicable)


# ------------------------------------------------------------------------------ bad files


def _save(data: np.ndarray, affine: np.ndarray, dest: Path, like: nib.Nifti1Image | None = None) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if like is not None:
        img.header.set_xyzt_units(*like.header.get_xyzt_units())
    nib.save(img, str(dest))
    return dest


def oblique_anisotropic_affine(affine: np.ndarray, spacing=(0.9, 1.1, 2.4), degrees=(17.0, -9.0, 23.0)) -> np.ndarray:
    """``affine`` with its rotation replaced by an oblique one (rotations about x, y, z) and an
    anisotropic voxel size; the origin is kept."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    return out


def make_bad_nifti(kind: str, good: str | os.PathLike, dest: str | os.PathLike, **kw) -> Path:
    """Write a broken copy of the NIfTI ``good`` at ``dest`` (``.nii.gz``) and return ``dest``.

    Kinds: ``missing_file`` (nothing written), ``truncated_gzip`` (first half of the bytes),
    ``corrupt_header`` (``sizeof_hdr`` 12345), ``two_d`` (the middle axial slice), ``four_d`` (three
    copies stacked on a 4th axis), ``three_d_dwi`` (the first volume of a 4D series), ``nan`` / ``inf``
    (a 4^3 block of NaN / one +Inf voxel), ``all_zero``, ``extreme_intensity`` (values x ``scale``,
    default 1e7), ``oblique_anisotropic`` (same voxels, oblique anisotropic affine), ``too_small``
    (a centred crop of ``size``, default 8 voxels per axis), ``no_overlap`` (same voxels, the affine
    translated along the first world axis by ``shift`` field-of-view widths, default 1.5: no overlap).
    """
    good, dest = Path(good), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing_file":
        return dest
    if kind in ("truncated_gzip", "corrupt_header"):
        raw = gzip.decompress(good.read_bytes()) if good.name.endswith(".gz") else good.read_bytes()
        if kind == "truncated_gzip":
            packed = gzip.compress(raw)
            dest.write_bytes(packed[: len(packed) // 2])
        else:
            bad = bytearray(raw)
            bad[0:4] = (12345).to_bytes(4, "little")
            dest.write_bytes(gzip.compress(bytes(bad)))
        return dest
    img = nib.load(str(good))
    data = np.asarray(img.dataobj).astype(np.float32)
    affine = img.affine
    if kind == "two_d":
        data = data[..., data.shape[2] // 2] if data.ndim == 3 else data[:, :, data.shape[2] // 2, 0]
    elif kind == "four_d":
        data = np.stack([data] * 3, axis=-1)
    elif kind == "three_d_dwi":
        data = data[..., 0] if data.ndim == 4 else data
    elif kind == "nan":
        c = [s // 2 for s in data.shape[:3]]
        data[c[0] : c[0] + 4, c[1] : c[1] + 4, c[2] : c[2] + 4] = np.nan
    elif kind == "inf":
        c = [s // 2 for s in data.shape[:3]]
        data[c[0], c[1], c[2]] = np.inf
    elif kind == "all_zero":
        data = np.zeros_like(data)
    elif kind == "extreme_intensity":
        data = data * float(kw.get("scale", 1e7))
    elif kind == "oblique_anisotropic":
        affine = oblique_anisotropic_affine(affine, **{k: kw[k] for k in ("spacing", "degrees") if k in kw})
    elif kind == "no_overlap":
        affine = np.array(affine, dtype=np.float64, copy=True)
        extent = np.abs(affine[:3, :3] @ np.asarray(data.shape[:3], dtype=np.float64))
        affine[0, 3] += float(kw.get("shift", 1.5)) * extent[0]
    elif kind == "too_small":
        size = kw.get("size", 8)
        size = [size] * 3 if isinstance(size, int) else list(size)
        lo = [max((s - n) // 2, 0) for s, n in zip(data.shape[:3], size)]
        data = data[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]
    else:
        raise KeyError(f"unknown fault kind {kind!r}")
    return _save(data, affine, dest, like=img)


def make_held_out_input(kind: str, good: str | os.PathLike, dest: str | os.PathLike, slice_mm: float = 7.0) -> Path:
    """``good`` (a NIfTI, 3D or 4D) in a form users have and the demo data never used; returns the path to feed.

    * ``nrrd``: the same voxels and geometry written by ITK as ``<dest>.nrrd``.
    * ``dicom_series``: a folder ``<dest>/`` of CT DICOM files, one per slice along the third axis, with
      ``ImagePositionPatient`` / ``ImageOrientationPatient`` of the NIfTI's geometry (3D only; int16 pixels: an
      image whose range is below 1000 is scaled up first, an intensity scale the MR normalisations ignore).
    * ``single_slice``: the middle slice along the third axis kept as a one-slice 3D (or 4D) NIfTI.
    * ``clinical_7mm``: resampled along the third axis to slices every ``slice_mm`` from the first one (linear;
      nearest for a label map, i.e. an integer file), the in-plane grid and the first slice kept.

    GDCM's writer sets the process locale to "C" and leaves it so; it is restored here.
    """
    import locale

    good, dest = Path(good), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem = dest.name.split(".")[0]
    img = nib.load(str(good))
    data = np.asarray(img.dataobj).astype(np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if kind == "nrrd":
        import itk

        out = dest.with_name(stem + ".nrrd")
        itk.imwrite(itk.imread(str(good)), str(out))
        return out
    if kind == "single_slice":
        mid = data.shape[2] // 2
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, 3] + affine[:3, 2] * mid
        return _save(data[:, :, mid : mid + 1], shifted, dest.with_name(stem + ".nii.gz"), like=img)
    if kind == "clinical_7mm":
        from scipy.ndimage import map_coordinates

        step = float(np.linalg.norm(affine[:3, 2]))
        # slices every slice_mm from the first one, as far as the volume reaches; a label map (integer file) nearest
        coords_z = np.arange(0.0, data.shape[2] - 1 + 1e-6, slice_mm / step)
        order = 0 if img.get_data_dtype().kind in "iu" else 1
        grid = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), coords_z, indexing="ij")
        vols = data[..., None] if data.ndim == 3 else data
        out = np.stack([map_coordinates(vols[..., t], grid, order=order, mode="nearest") for t in range(vols.shape[3])], -1)
        out = out[..., 0] if data.ndim == 3 else out
        scaled = affine.copy()
        scaled[:3, 2] = affine[:3, 2] * (slice_mm / step)
        return _save(out.astype(img.get_data_dtype() if order == 0 else np.float32), scaled, dest.with_name(stem + ".nii.gz"), like=img)
    if kind == "dicom_series":
        saved = locale.setlocale(locale.LC_ALL)
        try:
            return _write_dicom_series(data, affine, dest.with_name(stem))
        finally:
            locale.setlocale(locale.LC_ALL, saved)
    raise KeyError(f"unknown held-out kind {kind!r}")


def _write_dicom_series(data: np.ndarray, affine: np.ndarray, folder: Path) -> Path:
    import itk

    if data.ndim != 3:
        raise ValueError(f"a DICOM series is written from a 3D volume, got shape {data.shape}")
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row, col, normal = (lps @ affine[:3, i] / spacing[i] for i in range(3))
    # slices stacked along +-(row x col); a left-handed grid (e.g. LAS) is read back by ITK with its slices in the
    # other order: the same voxels in space on another index grid
    if abs(abs(float(np.dot(np.cross(row, col), normal))) - 1.0) > 1e-4:
        raise ValueError("the DICOM writer here needs slices stacked along their normal (an orthogonal affine)")
    if float(np.abs(data).max()) < 1000.0:
        data = data * (1000.0 / max(float(np.abs(data).max()), 1e-6))
    pixels = np.clip(np.round(data), -32768, 32767).astype(np.int16)
    folder.mkdir(parents=True)
    for k in range(pixels.shape[2]):
        sl = itk.image_from_array(np.ascontiguousarray(pixels[:, :, k].T)[None])  # ITK index (x, y) = NIfTI (i, j)
        pos = lps @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        sl.SetOrigin([float(v) for v in pos])
        sl.SetSpacing([float(spacing[0]), float(spacing[1]), float(spacing[2])])
        sl.SetDirection(itk.matrix_from_array(np.stack([row, col, normal], axis=1).copy()))
        md = sl.GetMetaDataDictionary()
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.10.11", "0020|000e": "1.2.826.0.1.3680043.10.12",
            "0008|0018": f"1.2.826.0.1.3680043.10.13.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos), "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *col)),
            "0018|0050": f"{spacing[2]:.4f}", "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
        }.items():
            md[tag] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(folder / f"slice_{k:04d}.dcm"), ImageIO=io).Update()
    return folder


def make_bad_labels(good: str | os.PathLike, dest: str | os.PathLike, value: int = 99, n: int = 5) -> Path:
    """A copy of the label map ``good`` with ``n`` voxels set to the out-of-set ``value``."""
    img = nib.load(str(good))
    data = np.ascontiguousarray(np.asarray(img.dataobj), dtype=np.int16)  # reshape(-1) must be a view
    flat = data.reshape(-1)
    flat[np.linspace(0, flat.size - 1, n).astype(int)] = value
    out = _save(data, img.affine, Path(dest))
    assert int((np.asarray(nib.load(str(out)).dataobj) == value).sum()) == n, f"{out}: the bad labels were not written"
    return out


def make_unwritable_dir(path: str | os.PathLike) -> Path:
    """A folder that cannot be written (mode 0o555). Tests running as root cannot be stopped by
    permissions, so a *file* is put where the folder should be: creating or writing the folder
    then fails for root too."""
    path = Path(path)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a file where an output folder is expected\n")
        return path
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


# ------------------------------------------------------------------------------ expected errors

#: what the shared guards (``CheckedLoadImaged``, ``ValidateImaged``) say about each bad 3D file made by
#: ``make_bad_nifti`` (``nan``: its 4^3 block; ``inf``: its one voxel): error class and message regex
GUARD_ERRORS = {
    "missing_file": (InputNotFoundError, r"does not exist"),
    "truncated_gzip": (InvalidInputError, r"truncated gzip file"),
    "corrupt_header": (InvalidInputError, r"corrupt NIfTI header.*sizeof_hdr.*expected 348"),
    "two_d": (InvalidInputError, r"holds a 2D image .*expected a 3D image"),
    "four_d": (InvalidInputError, r"4D image with 3 volumes/channels .*expected a 3D image \(1 channel\)"),
    "nan": (InvalidInputError, r"has 64 NaN and 0 Inf voxels .*expected finite values"),
    "inf": (InvalidInputError, r"has 0 NaN and 1 Inf voxels .*expected finite values"),
    "all_zero": (InvalidInputError, r"is all-zero: an empty volume; expected an image with contrast"),
}


def forget_bundle(bundle: str | os.PathLike) -> None:
    """Take ``bundle`` off ``sys.path`` and forget any imported ``scripts`` package, so the next run
    imports this bundle's scripts afresh (the suite does this around every test as well)."""
    import sys

    while str(bundle) in sys.path:
        sys.path.remove(str(bundle))
    for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[m]


# ------------------------------------------------------------------------------ checks


def input_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of an input as every bundle reads it (``CheckedLoadImaged``: NIfTI, NRRD,
    a DICOM series folder)."""
    from common.transforms.validation import CheckedLoadImaged

    img = CheckedLoadImaged("image", image_only=True)({"image": str(path)})["image"]
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def assert_in_input_geometry(output: str | os.PathLike, source: str | os.PathLike, atol: float = 1e-4) -> np.ndarray:
    """The 3D NIfTI ``output`` lies on the grid of the input ``source`` (the same shape, one-slice axes included,
    and the same affine, whatever the source's format); returns the output's voxels."""
    shape, affine = input_geometry(source)
    out = nib.load(str(output))
    assert tuple(out.shape) == shape, f"{Path(output).name}: shape {out.shape}, the input {shape}"
    np.testing.assert_allclose(out.affine, affine, atol=atol, err_msg=f"{Path(output).name}: not the input's affine")
    return np.asarray(out.dataobj)


def snapshot(*roots: str | os.PathLike) -> dict[str, tuple[int, float]]:
    """Every file under ``roots`` with its size and modification time."""
    out = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = (root.stat().st_size, root.stat().st_mtime)
        elif root.is_dir():
            for p in root.rglob("*"):
                if p.is_file():
                    out[str(p)] = (p.stat().st_size, p.stat().st_mtime)
    return out


def assert_nothing_written(before: dict, *roots: str | os.PathLike, allow: Iterable[str] = ()) -> None:
    """No file under ``roots`` was created, changed or removed since ``before`` (``snapshot``),
    apart from names matching a regex in ``allow`` (e.g. a log file); no temporary ``.part`` file is
    left anywhere."""
    after = snapshot(*roots)
    allowed = [re.compile(a) for a in allow]

    def ok(p):
        return any(a.search(p) for a in allowed)

    new = sorted(p for p in set(after) - set(before) if not ok(p))
    gone = sorted(p for p in set(before) - set(after) if not ok(p))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p] and not ok(p))
    parts = sorted(p for p in after if ".part" in Path(p).name)
    assert not (new or gone or changed or parts), f"new {new}, removed {gone}, changed {changed}, temporary {parts}"


def expect_refused(run: Callable[[], object], *patterns: str, exc_type: type | tuple = Exception,
                   roots: Iterable[str | os.PathLike] = (), allow: Iterable[str] = ()) -> BaseException:
    """:func:`expect_user_error` on ``run`` and no file written, changed or removed under ``roots`` meanwhile
    (:func:`assert_nothing_written`, ``allow`` as there). Returns the user error."""
    roots = tuple(roots)
    before = snapshot(*roots)
    err = expect_user_error(run, *patterns, exc_type=exc_type)
    assert_nothing_written(before, *roots, allow=allow)
    return err


def write_datalist(folder: str | os.PathLike, test=None, train=None, val=None, labels=None,
                   name: str = "datalist.json") -> str:
    """A datalist JSON ``folder/name`` with absolute paths; each split (``test``, ``training``, ``validation``) is one
    case (a dict), several (a list) or none; ``labels`` (the class names) only where given. Returns its path."""
    lists = {k: (v if isinstance(v, list) else [v] if v else []) for k, v in (("test", test), ("training", train),
                                                                             ("validation", val))}
    if labels is not None:
        lists["labels"] = labels
    path = Path(folder) / name
    path.write_text(json.dumps(lists))
    return str(path)


def expect_user_error(run: Callable[[], object], *patterns: str, exc_type: type | tuple = Exception) -> BaseException:
    """``run()`` must fail; behind the (possibly wrapped) failure there must be one user error of
    ``exc_type`` whose message matches every regex in ``patterns``. Returns that error."""
    try:
        run()
    except BaseException as e:  # noqa: BLE001 - any failure is inspected below
        err = find_user_error(e)
        assert err is not None, f"no user-facing error behind {type(e).__name__}: {e}"
        assert isinstance(err, exc_type), f"expected {exc_type}, got {type(err).__name__}: {err}"
        for pattern in patterns:
            assert re.search(pattern, str(err)), f"{pattern!r} not in: {err}"
        return err
    raise AssertionError("the run succeeded on bad input")
