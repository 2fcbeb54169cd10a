"""Input checks that turn bad data into one clear error naming the file.

Medical images from users are rarely as clean as a benchmark's: a 2D slice where a volume is
expected, a 4D series where a 3D image is expected, a DWI exported as a single volume, a
truncated download, NaN voxels from a failed reconstruction, an empty mask saved as the image.
Most of these pass silently through ``LoadImaged`` and fail much later (a shape error deep in a
network, a NaN loss, a black output). The transforms here stop them at the door:

* :class:`CheckedLoadImaged` / :func:`load_nifti_checked`: loading with one clear error for a
  missing file (``FileNotFoundError``), a truncated or corrupt gzip stream, a corrupt or foreign
  header, truncated voxel data, or an unusable affine (``ValueError``), each naming the file.
* :class:`ValidateImaged`: right after loading (``LoadImaged`` + ``EnsureChannelFirstd``, or
  :class:`CheckedLoadImaged` with ``ensure_channel_first=True``), checks dimensionality, channel
  count, finite values, constant (e.g. all-zero) volumes or channels, extreme intensities and a
  minimum spatial size (refused, or padded with a warning and ``Invertd``-invertible).
* :class:`ValidateLabeld`: label values must belong to the class set ``{0, ..., num_classes - 1}``.

Every error is a single exception whose message starts with the file name (the MetaTensor's
``filename_or_obj``, else the dictionary key) and says what was expected. Oblique and anisotropic
affines are valid input and pass unchanged: nothing here resamples or reorients.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, LoadImaged, MapTransform, SpatialPad
from monai.utils import TraceKeys

from common.utils.errors import InputNotFoundError, InvalidInputError

__all__ = [
    "CheckedLoadImaged",
    "ValidateImaged",
    "ValidateLabeld",
    "check_case_files",
    "check_gzip_integrity",
    "check_image_file",
    "describe_source",
    "load_nifti_checked",
]

#: ``sizeof_hdr`` of NIfTI-1 and NIfTI-2 headers (the first 4 bytes of every NIfTI file).
_NIFTI_HEADER_SIZES = {348: "NIfTI-1", 540: "NIfTI-2"}
_GZIP_MAGIC = b"\x1f\x8b"


def describe_source(img: Any, key: Hashable | None = None) -> str:
    """``"'<file>' (key 'image')"``: the file a tensor came from, else just its key."""
    name = None
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if isinstance(name, (list, tuple)):  # a collated batch: name the first file
            name = name[0] if len(name) else None
    if name:
        return f"'{name}'" + (f" (key '{key}')" if key is not None else "")
    return f"key '{key}'" if key is not None else "image"


# ---------------------------------------------------------------------------------------------
# File-level checks (loaders)
# ---------------------------------------------------------------------------------------------


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz"))


def _read_head(path: Path, n: int) -> bytes:
    """First ``n`` decompressed bytes of ``path`` (gzip-aware)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == _GZIP_MAGIC else open
    with opener(path, "rb") as fh:
        return fh.read(n)


def _gzip_problem(path: Path) -> str | None:
    """Decompress the whole stream; describe why it fails, or ``None`` if it is intact."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except EOFError:
        return "is a truncated gzip file (the compressed stream ends early: an interrupted download or copy)"
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        return f"is a corrupt gzip file ({e})"
    return None


def _header_size(head: bytes) -> tuple[str, int] | None:
    """Byte order and ``sizeof_hdr`` (348 or 540) of a NIfTI header's first bytes, else None."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0]
        if size in _NIFTI_HEADER_SIZES:
            return order, size
    return None


def _dim_field(head: bytes, order: str, size: int) -> tuple[int, ...]:
    """The 8 ``dim`` entries of a NIfTI-1 (348) or NIfTI-2 (540) header."""
    return struct.unpack(order + "8h", head[40:56]) if size == 348 else struct.unpack(order + "8q", head[16:80])


def _header_problem(path: Path) -> str | None:
    """Sanity of a NIfTI header: size field, magic string and dimensions. ``None`` if plausible."""
    head = _read_head(path, 540)
    if len(head) < 348:
        return f"is too short for a NIfTI header ({len(head)} bytes, a header has 348)"
    found = _header_size(head)
    if found is None:
        size = struct.unpack("<i", head[:4])[0]
        return (
            f"has a corrupt NIfTI header: the header size field (sizeof_hdr) is {size}, expected 348 "
            "(NIfTI-1) or 540 (NIfTI-2); the first bytes of the file are damaged or it is not a NIfTI file"
        )
    order, size = found
    if size == 348:
        magic = head[344:348]
        is_pair = path.name.lower().endswith((".hdr", ".hdr.gz"))
        if not is_pair and magic != b"n+1\x00":
            return f"has a corrupt NIfTI-1 header: magic string is {magic!r}, expected b'n+1\\x00'"
    elif len(head) < 540:
        return f"is too short for a NIfTI-2 header ({len(head)} bytes, a header has 540)"
    dims = _dim_field(head, order, size)
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]):
        return f"has a corrupt NIfTI header: dim = {list(dims)} (dim[0] must be 1..7 and each size >= 1)"
    return None


def _affine_problem(affine: Any) -> str | None:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape[-2:] not in ((4, 4), (3, 3)):
        return None
    if not np.all(np.isfinite(aff)):
        return "has a non-finite affine (NaN/Inf in the header's qform/sform or voxel sizes)"
    if abs(np.linalg.det(aff[:-1, :-1])) < 1e-12:
        return "has a singular affine (a voxel size of 0 or degenerate direction cosines in the header)"
    return None


def check_image_file(path: str | os.PathLike, key: Hashable | None = None) -> Path:
    """Cheap checks before reading: the file exists and, for NIfTI, its header is plausible.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is empty, or a NIfTI header is corrupt (wrong ``sizeof_hdr``, magic
            or dimensions). Reads only the first few hundred bytes.
    """
    path = Path(path)
    where = f"'{path}'" + (f" (key '{key}')" if key is not None else "")
    if not path.exists():
        raise InputNotFoundError(f"input file {where} does not exist")
    if path.is_dir():  # a DICOM series folder: left to the reader
        return path
    if path.stat().st_size == 0:
        raise InvalidInputError(f"input file {where} is empty (0 bytes)")
    if _is_nifti_name(path):
        try:
            problem = _header_problem(path)
        except EOFError:
            problem = "is a truncated gzip file (it ends inside the header)"
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            problem = f"is a corrupt gzip file ({e})"
        if problem:
            raise InvalidInputError(f"input file {where} {problem}")
    return path


def _nifti_dims(path: Path) -> list[int] | None:
    """``dim[1:dim[0]+1]`` of a plausible NIfTI header (after :func:`check_image_file`), else None."""
    head = _read_head(path, 540)
    found = _header_size(head)
    if found is None or (found[1] == 540 and len(head) < 540):
        return None
    dims = _dim_field(head, *found)
    return [int(d) for d in dims[1 : dims[0] + 1]]


def nifti_header_dims(path: str | os.PathLike) -> list[int] | None:
    """The image dimensions ``dim[1:dim[0]+1]`` of a NIfTI file's header (first bytes only), or ``None`` for
    another format, a folder or an implausible header (:func:`check_image_file` reports those)."""
    path = Path(path)
    if not path.is_file() or not _is_nifti_name(path):
        return None
    try:
        return _nifti_dims(path)
    except (EOFError, OSError, zlib.error, struct.error):
        return None


def check_case_files(cases: Sequence[Mapping[str, Any]], channels: Mapping[str, int], source: str = "the case list") -> None:
    """Every case of a multi-case run, before its first output is written: each key of ``channels`` is present,
    its file(s) exist and have a plausible header (:func:`check_image_file`), and NIfTI headers describe a 3D
    image with ``channels[key]`` channels in all (one file ``X x Y x Z [x C]``, or a list of files, one per
    channel), none of X, Y, Z equal to 1 (a single slice is not a 3D volume). Reads the first bytes of each file only (a DICOM folder or another format is left to its reader);
    the checks that need the voxels (NaN, constant images, label values) still run as each case loads, and the
    same messages as :class:`ValidateImaged` are used so a refusal reads the same wherever it is found.

    Raises:
        InputNotFoundError, InvalidInputError: naming the file, the key and the case.
    """
    for index, case in enumerate(cases):
        name = case.get("id", index) if isinstance(case, Mapping) else index
        for key, n in channels.items():
            if not isinstance(case, Mapping) or key not in case:
                raise InvalidInputError(f"case {name!r} of {source} has no '{key}' entry; expected a file path there")
            files = list(case[key]) if isinstance(case[key], (list, tuple)) else [case[key]]
            total, shapes = 0, []
            for f in files:
                path = check_image_file(f, key)
                dims = None if path.is_dir() or not _is_nifti_name(path) else _nifti_dims(path)
                if dims is None:  # not a NIfTI header: counted by its reader later
                    total = None
                    break
                where = f"input file '{path}' (key '{key}', case {name!r} of {source})"
                if len(dims) < 3:
                    raise InvalidInputError(f"{where} holds a {len(dims)}D image (header dimensions {dims}); expected a 3D image")
                if 1 in dims[:3]:  # the same refusal as ValidateImaged's for a 3D volume, found before any output
                    raise InvalidInputError(
                        f"{where} has spatial shape {tuple(dims[:3])}: a single slice (a 2D image) along axis "
                        f"{list(dims[:3]).index(1)}; expected a 3D volume"
                    )
                extra = [d for d in dims[3:] if d != 1]
                if len(extra) > 1:
                    raise InvalidInputError(f"{where} has header dimensions {dims}; expected a 3D image")
                c = extra[0] if extra else 1
                if len(files) == 1 and c != int(n) and c > 1:
                    raise InvalidInputError(
                        f"{where} is a {len(dims)}D image with {c} volumes/channels (header dimensions {dims}); "
                        f"expected a 3D image ({int(n)} channel{'s' if int(n) != 1 else ''})"
                    )
                total += c
                shapes.append(dims)
            if total is not None and total != int(n):
                raise InvalidInputError(
                    f"key '{key}' of case {name!r} of {source} ({', '.join(repr(str(f)) for f in files)}) has {total} "
                    f"channels (header dimensions {shapes}); expected {int(n)}: one image per channel"
                )


def _diagnose(path: Path, error: BaseException, key: Hashable | None = None) -> Exception:
    """The clearest error for a file a reader failed on: a cause found in the file, else the reader's."""
    where = f"'{path}'" + (f" (key '{key}')" if key is not None else "")
    if isinstance(error, FileNotFoundError) or not path.exists():
        return InputNotFoundError(f"input file {where} does not exist")
    problem = None
    if path.is_file():
        with open(path, "rb") as fh:
            is_gz = fh.read(2) == _GZIP_MAGIC
        if is_gz:
            problem = _gzip_problem(path)
        elif path.name.lower().endswith(".gz"):
            problem = "is named '.gz' but is not gzip-compressed"
        if problem is None and _is_nifti_name(path):
            problem = _header_problem(path)
    if problem is None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Expected" in reason and "bytes" in reason:  # nibabel's message for short voxel data
            problem = f"has truncated voxel data ({reason})"
        else:
            problem = f"cannot be read as an image: {type(error).__name__}: {reason}"
    return InvalidInputError(f"input file {where} {problem}")


def check_gzip_integrity(path: str | os.PathLike, key: Hashable | None = None) -> None:
    """Decompress a gzip file to its end and verify its CRC-32 and length trailer.

    Readers stop decompressing once they have the voxels they need, so the trailer is never
    checked and a damaged block in the middle of the stream can give wrong voxels without any
    error. Costs one extra decompression pass. No-op for files that are not gzip-compressed.

    Raises:
        ValueError: the stream is truncated or corrupt (message names the file).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(2) != _GZIP_MAGIC:
            return
    problem = _gzip_problem(path)
    if problem:
        raise InvalidInputError(f"input file '{path}'" + (f" (key '{key}')" if key is not None else "") + f" {problem}")


def load_nifti_checked(path: str | os.PathLike, key: Hashable | None = None, verify_gzip: bool = True):
    """Load a NIfTI file with nibabel, reading all voxels, or raise one clear error naming it.

    Returns an in-memory nibabel image (same class, affine and header; the voxel array already
    read and scaled, so later access cannot fail half-way). With ``verify_gzip`` (default) a
    compressed file is first checked to its CRC trailer (:func:`check_gzip_integrity`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: empty file, truncated or corrupt gzip, corrupt header (``sizeof_hdr``, magic,
            dimensions), truncated voxel data, or a non-finite/singular affine.
    """
    import nibabel as nib

    path = check_image_file(path, key)
    if verify_gzip:
        check_gzip_integrity(path, key)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises EOFError, OSError, ImageFileError, HeaderDataError, ...
        raise _diagnose(path, e, key) from e
    problem = _affine_problem(img.affine)
    if problem:
        raise InvalidInputError(f"input file '{path}'" + (f" (key '{key}')" if key is not None else "") + f" {problem}")
    return img.__class__(data, img.affine, img.header)


def _series_warning(folder: Path) -> str | None:
    try:
        from common.utils.dicom import series_geometry_warning

        return series_geometry_warning(folder)
    except Exception:  # no ITK, or not a DICOM folder: the reader reports what it cannot read
        return None


class _itk_warnings_off:
    """Silence ITK's global warning display while ``active`` (restored afterwards)."""

    def __init__(self, active: bool) -> None:
        self.active, self.previous = active, None

    def __enter__(self):
        if self.active:
            import itk

            self.previous = bool(itk.Object.GetGlobalWarningDisplay())
            itk.Object.SetGlobalWarningDisplay(False)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            import itk

            itk.Object.SetGlobalWarningDisplay(self.previous)


class CheckedLoadImaged(LoadImaged):
    """``monai.transforms.LoadImaged`` whose failures are one clear error naming the file and key.

    Same arguments as ``LoadImaged``, plus ``verify_gzip`` (default ``True``): check each
    compressed file's CRC trailer first (see :func:`check_gzip_integrity`; one extra
    decompression pass). This is needed: ITK (MONAI's first choice for NIfTI when installed)
    returns an image from a gzip file cut in half without any error, and nibabel decodes a
    damaged block in the middle of a stream into wrong voxels without any error.

    Before reading, each path is checked to exist (``FileNotFoundError``) and NIfTI headers are
    checked (``sizeof_hdr``, magic string and dimensions: nibabel silently "fixes" a damaged size
    field). When a reader fails (nibabel or ITK), the file is examined to name the cause:
    truncated gzip, corrupt gzip, corrupt header, truncated voxel data; the reader's message is
    kept as the cause (``raise ... from``). After reading, an affine with NaN/Inf or a zero
    determinant is refused.
    """

    def __init__(self, keys: KeysCollection, *args: Any, verify_gzip: bool = True, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        self.verify_gzip = bool(verify_gzip)

    def __call__(self, data: Mapping, reader=None) -> dict:
        explained = False
        for key in self.key_iterator(dict(data)):
            for p in self._paths(data[key]):
                check_image_file(p, key)
                if self.verify_gzip and p.is_file():
                    check_gzip_integrity(p, key)
                if p.is_dir():  # a DICOM series: say what ITK's even grid does to uneven or tilted slices
                    message = _series_warning(p)
                    if message:
                        warnings.warn(f"{message} (key '{key}')", UserWarning, stacklevel=2)
                        explained = True
        try:
            with _itk_warnings_off(explained):  # ITK's own "non uniform sampling" line would only repeat it
                d = super().__call__(data, reader)
        except Exception as e:
            key, path = self._failing(data, e)
            if path is None:
                raise
            raise _diagnose(path, e, key) from e
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, MetaTensor):
                problem = _affine_problem(img.affine)
                if problem:
                    raise InvalidInputError(f"input file {describe_source(img, key)} {problem}")
        return d

    @staticmethod
    def _paths(value: Any) -> list[Path]:
        if isinstance(value, (str, os.PathLike)):
            return [Path(value)]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
            return [Path(v) for v in value]
        return []

    def _failing(self, data: Mapping, error: BaseException) -> tuple[Hashable | None, Path | None]:
        """The key and path the reader failed on: the one named in the error, else the first."""
        candidates = [(k, p) for k in self.key_iterator(dict(data)) for p in self._paths(data[k])]
        for k, p in candidates:
            if str(p) in str(error) or p.name in str(error):
                return k, p
        for k, p in candidates:  # re-examine each file; the first with a problem is the culprit
            if _diagnose(p, error, k).args[0].find("cannot be read as an image") < 0:
                return k, p
        return candidates[0] if candidates else (None, None)


# ---------------------------------------------------------------------------------------------
# Tensor-level checks
# ---------------------------------------------------------------------------------------------


def _per_key(value: Any, key: Hashable) -> Any:
    return value.get(key) if isinstance(value, Mapping) else value


class ValidateImaged(MapTransform, InvertibleTransform):
    """Refuse images that a 3D network cannot use, with one ``ValueError`` naming the file.

    Place it right after loading, when the images are channel-first (``LoadImaged`` +
    ``EnsureChannelFirstd``, or ``LoadImaged(ensure_channel_first=True)``).

    Args:
        keys: keys of the images to check.
        spatial_dims: number of spatial axes expected (3 for volumes).
        channels: expected channel count: an ``int`` (exact; ``1`` for a plain 3D image), ``"dwi"``
            (a 4D diffusion series: at least 2 volumes along the 4th file axis), or ``None`` (any).
            A dict gives one value per key (``{"image": 4, "dwi": "dwi"}``).
        allow_channel_last_4d: accept the layout ``LoadImaged`` gives without
            ``EnsureChannelFirstd``: ``(H, W, D)`` is one channel and ``(H, W, D, C)`` has its
            channels last (detected from the ``spatial_shape`` meta). When false (default), such
            a tensor is refused with a hint to add ``EnsureChannelFirstd``, because every later
            transform would take the wrong axis for channels.
        require_finite: refuse NaN or Inf voxels (the message counts them).
        reject_constant: refuse an image, or one of its channels, whose voxels all have the same
            value (an all-zero volume, an empty mask saved as the image, a missing modality).
        min_spatial_size: smallest accepted spatial size (an int for every axis, or one per
            axis). Smaller images are refused, unless ``pad_small`` is true.
        pad_small: pad images smaller than ``min_spatial_size`` symmetrically up to it with the
            image minimum (the background: 0 in MR, air in CT), with a ``UserWarning`` naming
            the file. The padding is recorded, so ``Invertd`` crops it away from predictions.
        max_abs: refuse images with finite voxels of magnitude above this value (for example
            ``1e5`` for CT in HU: such values mean a wrong scaling in the header or raw scanner
            units). A dict gives one value per key.
        modality: the modality the pipeline normalises for (``"CT"`` or ``"MR"``; a dict gives one
            per key; ``None``: not checked). An image whose intensities contradict it gets a
            ``UserWarning`` naming the file: ``"CT"`` with no voxel below -50 (CT in HU has air near
            -1000 and fat near -100: an MR image, or a CT in raw scanner units, would be clipped to
            a meaningless HU window), ``"MR"`` with 5 % or more of its voxels below -500 (a CT in HU,
            which the percentile rule would normalise into a plausible-looking but wrong input).
            A warning, not an error: a tight crop of soft tissue can be a valid CT without fat.
        allow_missing_keys: skip absent keys.

    Besides these, a MetaTensor whose affine has NaN/Inf or a zero determinant is refused.
    Oblique or anisotropic affines are valid and the image passes through unchanged (the same
    object is returned for every key that needs no padding).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 3,
        channels: int | str | Mapping[Hashable, int | str | None] | None = None,
        allow_channel_last_4d: bool = False,
        require_finite: bool = True,
        reject_constant: bool = True,
        min_spatial_size: int | Sequence[int] | None = None,
        max_abs: float | Mapping[Hashable, float | None] | None = None,
        pad_small: bool = False,
        allow_missing_keys: bool = False,
        modality: str | Mapping[Hashable, str | None] | None = None,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.modality = modality
        self.spatial_dims = int(spatial_dims)
        self.channels = channels
        for k in self.keys:
            c = _per_key(channels, k)
            if not (c is None or c == "dwi" or (isinstance(c, int) and c >= 1)):
                raise ValueError(f"channels for key '{k}' must be a positive int, 'dwi' or None, got {c!r}")
        self.allow_channel_last_4d = bool(allow_channel_last_4d)
        self.require_finite = bool(require_finite)
        self.reject_constant = bool(reject_constant)
        self.min_spatial_size = None
        if min_spatial_size is not None:
            size = (
                (min_spatial_size,) * self.spatial_dims
                if isinstance(min_spatial_size, int)
                else tuple(min_spatial_size)
            )
            if len(size) != self.spatial_dims:
                raise ValueError(f"min_spatial_size {tuple(size)} must have {self.spatial_dims} values")
            self.min_spatial_size = tuple(int(s) for s in size)
        self.max_abs = max_abs
        self.pad_small = bool(pad_small)
        # SpatialPad pads only the axes smaller than spatial_size, to exactly that size
        self.padder = SpatialPad(spatial_size=self.min_spatial_size or (1,) * self.spatial_dims, method="symmetric")

    # -- layout --------------------------------------------------------------------------------

    def _layout(self, img: torch.Tensor, key: Hashable) -> tuple[int, tuple[int, ...], bool]:
        """(channels, spatial shape, channels_last) of ``img``, or a ValueError on wrong dimensionality."""
        where = describe_source(img, key)
        shape = tuple(int(s) for s in img.shape)
        sd = self.spatial_dims
        file_shape = None
        if isinstance(img, MetaTensor) and img.meta.get("spatial_shape") is not None:
            file_shape = tuple(int(s) for s in np.atleast_1d(np.asarray(img.meta["spatial_shape"])))
        axes = ", ".join(["H", "W", "D"][:sd]) if sd <= 3 else f"{sd} spatial axes"
        expected = f"a {sd}D image, channel-first (C, {axes})"
        if file_shape is not None and len(file_shape) != sd:
            raise InvalidInputError(
                f"{where} holds a {len(file_shape)}D image (spatial shape {file_shape}, tensor shape {shape}); "
                f"expected {expected}"
            )
        if len(shape) == sd + 1:
            if file_shape is not None and shape[1:] != file_shape and shape[:-1] == file_shape:
                if not self.allow_channel_last_4d:
                    raise InvalidInputError(
                        f"{where} has its channels last (tensor shape {shape}, spatial shape {file_shape}); "
                        "expected channel-first: add EnsureChannelFirstd (or LoadImaged(ensure_channel_first=True)) "
                        "before ValidateImaged, or set allow_channel_last_4d"
                    )
                return shape[-1], shape[:-1], True
            return shape[0], shape[1:], False
        if len(shape) == sd and self.allow_channel_last_4d:
            return 1, shape, False
        if len(shape) == sd:
            raise InvalidInputError(
                f"{where} has tensor shape {shape} without a channel axis, or is a {sd - 1}D image with one channel; "
                f"expected {expected}: add EnsureChannelFirstd before ValidateImaged"
            )
        raise InvalidInputError(
            f"{where} has {len(shape)} dimensions (tensor shape {shape}); expected {expected}, i.e. {sd + 1} dimensions"
        )

    def _check_channels(self, n: int, key: Hashable, where: str, shape: tuple[int, ...]) -> None:
        want = _per_key(self.channels, key)
        if want is None:
            return
        if want == "dwi":
            if n < 2:
                raise InvalidInputError(
                    f"{where} is a 3D image (one volume, tensor shape {shape}); expected a 4D diffusion-weighted "
                    "series with one volume per gradient direction along the 4th axis"
                )
            return
        if n != want:
            if want == 1:
                raise InvalidInputError(
                    f"{where} is a 4D image with {n} volumes/channels (tensor shape {shape}); "
                    "expected a 3D image (1 channel)"
                )
            raise InvalidInputError(f"{where} has {n} channels (tensor shape {shape}); expected {want}")

    def _check_modality(self, x: torch.Tensor, finite: torch.Tensor, key: Hashable, where: str) -> None:
        """Warn when the intensities contradict the configured modality (see ``modality``)."""
        modality = _per_key(self.modality, key)
        if modality is None or x.numel() == 0:
            return
        modality = str(modality).upper()
        values = x[finite] if not bool(finite.all()) else x
        if values.numel() == 0:
            return
        if modality == "CT":
            lo = float(values.min())
            if lo >= -50.0:
                warnings.warn(
                    f"{where} has no voxel below -50 (minimum {lo:g}) but the config key 'modality' is 'CT': CT in "
                    "Hounsfield units has air near -1000 and fat near -100. Is it an MR image (set modality to "
                    "'MR' and use a model trained on MR) or a CT in raw scanner units (convert it to HU)? "
                    "The segmentation of such an input is not meaningful",
                    UserWarning,
                    stacklevel=2,
                )
        elif modality in ("MR", "MRI"):
            frac = float((values < -500.0).float().mean())
            if frac >= 0.05:
                warnings.warn(
                    f"{where} has {100 * frac:.0f} % of its voxels below -500 but the config key 'modality' is "
                    f"'{modality}': that is air in a CT in Hounsfield units. Is it a CT (set modality to 'CT' and "
                    "use a model trained on CT)? The segmentation of such an input is not meaningful",
                    UserWarning,
                    stacklevel=2,
                )

    # -- main ----------------------------------------------------------------------------------

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._validate(d[key], key)
        return d

    def _validate(self, img: Any, key: Hashable) -> Any:
        if not isinstance(img, (torch.Tensor, np.ndarray)):
            raise InvalidInputError(
                f"key '{key}' holds a {type(img).__name__}, expected a loaded image (add LoadImaged first)"
            )
        where = describe_source(img, key)
        if isinstance(img, MetaTensor):
            problem = _affine_problem(img.affine)
            if problem:
                raise InvalidInputError(f"{where} {problem}")
        n_ch, spatial, last = self._layout(img, key)
        self._check_channels(n_ch, key, where, tuple(img.shape))
        if any(s == 1 for s in spatial):
            raise InvalidInputError(
                f"{where} has spatial shape {spatial}: a single slice (a 2D image) along axis "
                f"{spatial.index(1)}; expected a {self.spatial_dims}D volume"
            )

        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)  # no meta tracking
        if not x.is_floating_point():
            x = x.float()
        problems = []
        finite = torch.isfinite(x)
        if self.require_finite and not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            problems.append(f"has {n_nan} NaN and {n_inf} Inf voxels (of {x.numel()}); expected finite values")
        if self.reject_constant:
            xc = torch.movedim(x, -1, 0) if last else (x if x.ndim == self.spatial_dims + 1 else x[None])
            xc = xc.reshape(xc.shape[0], -1)
            if bool(finite.all()):
                lo, hi = xc.amin(1), xc.amax(1)
            else:  # ignore non-finite voxels here: they are reported above
                fin = torch.isfinite(xc)
                lo = torch.where(fin, xc, torch.full_like(xc, float("inf"))).amin(1)
                hi = torch.where(fin, xc, torch.full_like(xc, float("-inf"))).amax(1)
            const = [c for c in range(xc.shape[0]) if bool(lo[c] >= hi[c])]
            if len(const) == xc.shape[0]:
                val = float(lo[0]) if torch.isfinite(lo[0]) else float("nan")
                what = "all-zero" if val == 0 else f"constant (every voxel = {val:g})"
                problems.append(f"is {what}: an empty volume; expected an image with contrast")
            elif const:
                problems.append(
                    f"has constant channel(s) {const} of {xc.shape[0]} (an all-zero or missing modality/volume)"
                )
        max_abs = _per_key(self.max_abs, key)
        if max_abs is not None:
            big = finite & (x.abs() > float(max_abs))
            n_big = int(big.sum())
            if n_big:
                peak = float(x[big].abs().max())
                problems.append(
                    f"has {n_big} voxels with |value| > {float(max_abs):g} (largest {peak:g}); "
                    "expected intensities within that bound (wrong scaling in the header, or raw scanner units?)"
                )
        if problems:
            raise InvalidInputError(f"{where} " + "; ".join(problems))
        self._check_modality(x, finite, key, where)

        if self.min_spatial_size is not None and any(
            s < m for s, m in zip(spatial, self.min_spatial_size, strict=True)
        ):
            if not self.pad_small:
                raise InvalidInputError(
                    f"{where} has spatial size {spatial}, smaller than the minimum {self.min_spatial_size} "
                    "this network needs; expected a larger volume (or set pad_small to pad it)"
                )
            if last or img.ndim == self.spatial_dims:
                raise InvalidInputError(
                    f"{where}: padding needs a channel-first image; add EnsureChannelFirstd before ValidateImaged"
                )
            target = tuple(max(s, m) for s, m in zip(spatial, self.min_spatial_size, strict=True))
            warnings.warn(
                f"{where} has spatial size {spatial}, smaller than {self.min_spatial_size}: padded to {target}",
                stacklevel=2,
            )
            return self._pad(img, x)
        return img

    def _pad(self, img: Any, x: torch.Tensor) -> Any:
        # the image minimum is its background (0 in MR, air in CT); zero would be water in CT
        out = self.padder(img, value=float(torch.nan_to_num(x).min()))
        if isinstance(out, MetaTensor) and out.applied_operations and self.tracing:
            # nest the padder's record in ours, so that inverse() knows the padding was ours
            pad_info = out.applied_operations.pop()
            self.push_transform(out, orig_size=tuple(img.shape[1:]), extra_info={"pad_info": pad_info})
        return out

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Crop away the padding added by ``pad_small`` (keys that were not padded are unchanged)."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            ops = getattr(img, "applied_operations", None)
            if not ops or ops[-1].get(TraceKeys.CLASS_NAME) != self.__class__.__name__:
                continue  # this key passed unpadded: nothing was recorded
            transform = self.pop_transform(img)
            img.applied_operations.append(transform[TraceKeys.EXTRA_INFO]["pad_info"])
            d[key] = self.padder.inverse(img)
        return d


class ValidateLabeld(MapTransform):
    """Refuse label maps with values outside the class set ``{0, ..., num_classes - 1}``.

    Args:
        keys: keys of label maps (class indices, any layout).
        num_classes: number of classes including background, or the class set itself (a list,
            tuple or set of the valid label values, e.g. MAISI's ids 0..132 and body 200); a dict
            gives one per key.
        allow_missing_keys: skip absent keys.

    Non-integer values (e.g. 0.5 after linear interpolation of a mask) and NaN are outside the
    class set too. The ``ValueError`` names the file, the offending values (up to 10) and how many
    voxels carry them.
    """

    def __init__(
        self, keys: KeysCollection, num_classes: int | Sequence[int] | Mapping[Hashable, int | Sequence[int]], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            spec = _per_key(self.num_classes, key)
            x = torch.as_tensor(d[key])
            values, counts = torch.unique(x, return_counts=True)
            vf = values.double()
            if isinstance(spec, (list, tuple, set, frozenset)):  # an explicit class set
                valid = sorted({int(v) for v in spec})
                ok = torch.isin(vf, torch.tensor(valid, dtype=torch.float64))
                bad = ~(torch.isfinite(vf) & ok)
                n = len(valid)
                set_text = _describe_class_set(valid)
            else:
                n = int(spec)
                bad = ~(torch.isfinite(vf) & (vf == torch.round(vf)) & (vf >= 0) & (vf <= n - 1))
                set_text = f"{{0, ..., {n - 1}}}"
            if bool(bad.any()):
                vals, cnts = values[bad].tolist(), counts[bad].tolist()
                shown = ", ".join(f"{v:g} ({c} voxels)" for v, c in zip(vals[:10], cnts[:10], strict=True))
                more = f" and {len(vals) - 10} more" if len(vals) > 10 else ""
                raise InvalidInputError(
                    f"label {describe_source(d[key], key)} has values outside the class set "
                    f"{set_text} ({n} classes): {shown}{more}"
                )
        return d


def _describe_class_set(values: Sequence[int]) -> str:
    """``{0, ..., 132, 200}``: sorted values with runs of consecutive integers shortened."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(f"{values[i]}, ..., {values[j]}" if j - i >= 2 else ", ".join(str(v) for v in values[i : j + 1]))
        i = j + 1
    return "{" + ", ".join(parts) + "}"


class ReportCroppedTissued(MapTransform):
    """Log, per case, how much tissue a centre crop to ``spatial_size`` will drop (``ResizeWithPadOrCropd``).

    Put it right before the crop: when the body is larger than the model's grid along an axis, the voxels
    above ``threshold`` (tissue after intensity scaling) that fall outside the central box are counted and
    one warning names the file, the grid, and how much is lost (voxels, percent, and the axes cut). Nothing
    is changed; a case that fits logs nothing.
    """

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int], threshold: float = 0.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = [int(v) for v in spatial_size]
        self.threshold = float(threshold)
        self.logger = logging.getLogger(__name__)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            tissue = torch.as_tensor(x).detach().amax(dim=0) > self.threshold
            total = int(tissue.sum())
            box, cut = [], []
            for axis, (n, size) in enumerate(zip(tissue.shape, self.spatial_size)):
                if size <= 0 or n <= size:
                    box.append(slice(None))
                    continue
                start = n // 2 - size // 2  # MONAI's centre crop
                box.append(slice(start, start + size))
                cut.append(axis)
            if not cut or total == 0:
                continue
            dropped = total - int(tissue[tuple(box)].sum())
            if dropped > 0:
                self.logger.warning(
                    "%s: cropping %s to the model grid %s drops %d of %d tissue voxels (%.2f %%) along axes %s",
                    describe_source(x, key), list(tissue.shape), self.spatial_size, dropped, total, 100.0 * dropped / total, cut,
                )
        return d
