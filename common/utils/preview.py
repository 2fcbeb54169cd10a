"""PNG previews of 3D volumes: orthogonal slices through the centre, one row per volume.

Used by the evaluate workflows (montages of source / generated / target / error) and by the demo
report. Volumes are drawn in RAS voxel order as stored; label maps get a discrete colour map.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["orthogonal_slices", "save_montage"]


def _as_array(vol) -> np.ndarray:
    if isinstance(vol, (str, os.PathLike)):
        import nibabel as nib

        vol = np.asarray(nib.load(str(vol)).dataobj)
    if hasattr(vol, "detach"):
        vol = vol.detach().cpu().numpy()
    arr = np.asarray(vol, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 4:  # channel-last or multi-channel: show the first channel
        arr = arr[..., 0] if arr.shape[-1] <= 4 else arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume for the preview, got shape {arr.shape}")
    return arr


def orthogonal_slices(vol, index: Sequence[int] | None = None) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices through ``index`` (default: the centre), rotated for display."""
    arr = _as_array(vol)
    i, j, k = index if index is not None else [s // 2 for s in arr.shape]
    return [np.rot90(arr[i, :, :]), np.rot90(arr[:, j, :]), np.rot90(arr[:, :, k])]


def save_montage(
    volumes: Mapping[str, object],
    out_png: str | os.PathLike,
    labels: Sequence[str] = (),
    vrange: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Path:
    """Write a grid PNG: one row per volume (sagittal, coronal, axial through the centre).

    Args:
        volumes: title -> 3D array, tensor or NIfTI path (all shown with their own centre).
        out_png: destination; written atomically.
        labels: titles of volumes that are label maps (nearest display, discrete colours).
        vrange: optional title -> (vmin, vmax) display window; default 1st-99th percentile.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.utils.io import atomic_write

    names = list(volumes)
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        arr = _as_array(volumes[name])
        is_label = name in labels
        if vrange and name in vrange:
            lo, hi = vrange[name]
        elif is_label:
            lo, hi = 0, max(1.0, float(arr.max()))
        else:
            lo, hi = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1e-6
        for c, sl in enumerate(orthogonal_slices(arr)):
            ax = axes[r][c]
            ax.imshow(sl, cmap="tab20" if is_label else "gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    for c, plane in enumerate(("sagittal", "coronal", "axial")):
        axes[0][c].set_title(plane, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_write(out_png) as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return out_png
