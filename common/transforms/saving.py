"""``SaveImaged`` that never leaves a half-written output and never overwrites one silently.

:class:`SafeSaveImaged` takes every argument of ``monai.transforms.SaveImaged`` (so a config
swaps one ``_target_`` for the other) plus ``overwrite``:

* the output folder is checked to be writable when the transform is built, so a read-only or
  mistyped ``output_dir`` fails before any inference runs (``PermissionError`` naming it);
* an existing output file is refused (``FileExistsError`` naming the file and the config key
  ``overwrite``) unless ``overwrite=True``;
* each file is written under a temporary name in its destination folder and renamed into place,
  so an interrupted or failing write leaves neither a partial output nor a temporary file (a
  process killed outright, e.g. by SIGKILL, can leave a hidden ``.<name>.*.part<ext>`` file,
  never a partial file under the output name).

File names, resampling, output dtype, affine and metadata handling are ``SaveImage``'s own: the
writer is called exactly as ``SaveImage`` calls it, only with the temporary name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.apps.utils import get_logger
from monai.config import DtypeLike, KeysCollection
from monai.data import FolderLayoutBase, MetaTensor
from monai.transforms import SaveImage, SaveImaged, Transform
from monai.utils import GridSamplePadMode
from monai.utils.enums import PostFix

from common.utils.io import check_writable_dir, refuse_overwrite

__all__ = ["SafeSaveImage", "SafeSaveImaged"]

DEFAULT_POST_FIX = PostFix.meta()
logger = get_logger(module_name=__name__)


def _reshape_written(path: str, shape: tuple[int, ...]) -> None:
    """Give the NIfTI at ``path`` the spatial ``shape`` it lost to the writer's squeeze (same voxel count)."""
    import nibabel as nib

    img = nib.load(path)
    if tuple(img.shape) == shape:
        return
    if int(np.prod(img.shape)) != int(np.prod(shape)):
        raise ValueError(f"cannot write {tuple(img.shape)} voxels as shape {shape}")
    data = np.asarray(img.dataobj).reshape(shape)
    out = type(img)(data, img.affine, header=img.header)
    out.set_data_dtype(img.get_data_dtype())
    nib.save(out, path)


class SafeSaveImage(SaveImage):
    """``monai.transforms.SaveImage`` with a writability check, overwrite refusal and atomic writes.

    Args:
        overwrite: replace existing output files (default: refuse them).
        **kwargs: as ``SaveImage``.
    """

    def __init__(self, *args, overwrite: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overwrite = bool(overwrite)
        out_dir = getattr(self.folder_layout, "output_dir", None)
        if out_dir is not None:
            check_writable_dir(out_dir, "output folder", create=False)  # parsing a config creates nothing

    def __call__(self, img: torch.Tensor | np.ndarray, meta_data: dict | None = None, filename=None,
                 spatial_shape: Sequence[int] | None = None):
        """Write ``img`` (as ``SaveImage``) atomically to its final name.

        ``spatial_shape``: the shape the written file must have where MONAI's writer would squeeze singleton axes
        (a one-slice volume ``H x W x 1`` is written ``H x W`` otherwise); the same voxels, the header kept.
        """
        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        if filename is not None:
            final = f"{filename}{self.output_ext}"
        else:
            final = self._contained_filename(meta)
        final = Path(final)
        refuse_overwrite(final, self.overwrite)
        check_writable_dir(final.parent, "output folder")
        ext = self.output_ext
        # the temporary name keeps the extension: writers choose format and compression from it
        stem = final.name[: len(final.name) - len(ext)] if ext and final.name.endswith(ext) else final.name
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{ext}", dir=final.parent)
        os.close(fd)
        verbose = self.write_kwargs.get("verbose", False)
        self.write_kwargs["verbose"] = False  # the writer would log the temporary name
        try:
            try:
                super().__call__(img, meta_data, filename=tmp[: len(tmp) - len(ext)] if ext else tmp)
            except RuntimeError as e:
                # SaveImage reports any writer failure (a full disk too) as "cannot find a
                # suitable writer" with tracebacks; name the output and the actual reason instead
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                raise RuntimeError(f"writing '{final}' failed: {lines[-1] if lines else e}") from e
            if spatial_shape is not None:
                _reshape_written(tmp, tuple(int(n) for n in spatial_shape))
            os.chmod(tmp, 0o644)
            if self.overwrite:
                os.replace(tmp, final)
            else:
                self._rename_no_clobber(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        finally:
            self.write_kwargs["verbose"] = verbose
        if verbose:
            logger.info(f"writing: {final}")
        if self.savepath_in_metadict and meta is not None:
            meta["saved_to"] = str(final)  # SaveImage recorded the temporary name
        return img

    def _contained_filename(self, meta: dict | None) -> str:
        """The output name, always inside ``output_dir``.

        With ``data_root_dir`` set, MONAI keeps the input's sub-folders relative to it; an input
        outside ``data_root_dir`` gives a relative path starting with ``..`` and the file would be
        written outside ``output_dir`` (next to the input). Such an input keeps only its parent
        folder's name instead: ``<output_dir>/<parent>/<name>_<postfix>``.
        """
        layout = self.folder_layout
        name = layout.filename(**self.fname_formatter(meta, self))
        out_dir = getattr(layout, "output_dir", None)
        root = getattr(layout, "data_root_dir", "")
        source = (meta or {}).get("filename_or_obj") if isinstance(meta, dict) else None
        if not (out_dir and root and source):
            return name
        out_abs = os.path.abspath(out_dir)
        if os.path.abspath(name).startswith(out_abs + os.sep):
            return name
        layout.data_root_dir = os.path.dirname(os.path.dirname(os.path.abspath(str(source))))
        try:
            return layout.filename(**self.fname_formatter(meta, self))
        finally:
            layout.data_root_dir = root

    @staticmethod
    def _rename_no_clobber(tmp: str, final: Path) -> None:
        """Move ``tmp`` to ``final`` unless ``final`` appeared meanwhile (another process)."""
        try:
            os.link(tmp, final)  # fails if final exists: no window between check and rename
        except FileExistsError:
            refuse_overwrite(final, False)
        except OSError:  # file systems without hard links
            refuse_overwrite(final, False)
            os.replace(tmp, final)
            return
        os.remove(tmp)


class SafeSaveImaged(SaveImaged):
    """``monai.transforms.SaveImaged`` that refuses to overwrite and writes atomically.

    Every argument is ``SaveImaged``'s (same names, same defaults), plus:

    Args:
        overwrite: replace existing output files. Default ``False``: an existing file raises
            ``FileExistsError`` naming it and the key ``overwrite``.

    Raises at construction ``PermissionError`` naming ``output_dir`` when it cannot be created
    or written.
    """

    def __init__(
        self,
        keys: KeysCollection,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = DEFAULT_POST_FIX,
        output_dir: Path | str = "./",
        output_postfix: str = "trans",
        output_ext: str = ".nii.gz",
        resample: bool = False,
        mode: str = "nearest",
        padding_mode: str = GridSamplePadMode.BORDER,
        scale: int | None = None,
        dtype: DtypeLike = np.float64,
        output_dtype: DtypeLike | None = np.float32,
        allow_missing_keys: bool = False,
        squeeze_end_dims: bool = True,
        data_root_dir: str = "",
        separate_folder: bool = True,
        print_log: bool = True,
        output_format: str = "",
        writer=None,
        output_name_formatter: Callable[[dict, Transform], dict] | None = None,
        folder_layout: FolderLayoutBase | None = None,
        savepath_in_metadict: bool = False,
        overwrite: bool = False,
    ) -> None:
        kwargs = dict(
            output_dir=output_dir,
            output_postfix=output_postfix,
            output_ext=output_ext,
            resample=resample,
            mode=mode,
            padding_mode=padding_mode,
            scale=scale,
            dtype=dtype,
            output_dtype=output_dtype,
            squeeze_end_dims=squeeze_end_dims,
            data_root_dir=data_root_dir,
            separate_folder=separate_folder,
            print_log=print_log,
            output_format=output_format,
            writer=writer,
            output_name_formatter=output_name_formatter,
            folder_layout=folder_layout,
            savepath_in_metadict=savepath_in_metadict,
        )
        super().__init__(
            keys,
            meta_keys=meta_keys,
            meta_key_postfix=meta_key_postfix,
            allow_missing_keys=allow_missing_keys,
            **kwargs,
        )
        self.overwrite = bool(overwrite)
        self.saver = SafeSaveImage(overwrite=overwrite, **kwargs)
