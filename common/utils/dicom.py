"""Slice geometry of a DICOM series folder, checked before ITK reads it onto a regular grid.

ITK's ``ImageSeriesReader`` (MONAI's ``ITKReader`` for a folder) builds one evenly spaced 3D grid: the slice
spacing is the distance from the first to the last slice divided by the number of gaps, the direction is the
slices' orientation (``ImageOrientationPatient``). Two kinds of clinical series do not fit that grid, and ITK
says no more than "Non uniform sampling or missing slices detected":

- **non-uniform spacing** (missing slices, mixed-thickness stacks): each slice is placed at its index on the
  even grid, up to half a gap or more away from its recorded position;
- **gantry tilt** (CT acquired with a tilted gantry): successive slice positions move in-plane, so the volume is
  sheared; the grid keeps the slice orientation and drops the shear.

:func:`series_geometry_warning` reads only the headers (``ImagePositionPatient``, ``ImageOrientationPatient``)
and returns one sentence that says what the output grid is and how far slices lie from their true positions.
An oblique series whose slices are stacked along their normal is valid and returns ``None``: ITK keeps its
direction cosines exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["series_slice_positions", "series_geometry_warning"]


def _vector(text: str) -> np.ndarray:
    return np.asarray([float(v) for v in str(text).strip().strip("\\").split("\\")], dtype=np.float64)


def series_slice_positions(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(positions (N, 3), row cosine (3,), column cosine (3,))`` of the first series in ``folder`` (the one ITK
    reads), in file order of ITK's series sorter; ``None`` when the folder holds no readable series or its slices
    lack the position tags."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    uids = names.GetSeriesUIDs()
    if not uids:
        return None
    files = names.GetFileNames(uids[0])
    positions, orient = [], None
    for f in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(f))
        io.ReadImageInformation()
        md = io.GetMetaDataDictionary()
        if not (md.HasKey("0020|0032") and md.HasKey("0020|0037")):
            return None
        positions.append(_vector(md["0020|0032"]))
        orient = orient if orient is not None else _vector(md["0020|0037"])
    if orient is None or orient.size != 6 or len(positions) < 2:
        return None
    return np.stack(positions), orient[:3], orient[3:]


def series_geometry_warning(folder: str | os.PathLike, rel_tol: float = 0.01) -> str | None:
    """One sentence when the series in ``folder`` does not fit an evenly spaced grid (non-uniform slice spacing or
    gantry tilt), else ``None``. ``rel_tol``: allowed spread of the gaps, relative to their median."""
    geometry = series_slice_positions(folder)
    if geometry is None:
        return None
    pos, row, col = geometry
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = pos @ normal
    order = np.argsort(along)
    pos, along = pos[order], along[order]
    n = len(along)
    even = along[0] + (along[-1] - along[0]) * np.arange(n) / (n - 1)
    gaps = np.diff(along)
    problems = []
    median = float(np.median(gaps))
    off = float(np.abs(along - even).max())
    if gaps.max() - gaps.min() > max(rel_tol * abs(median), 1e-3):
        problems.append(
            f"non-uniform slice spacing (gaps {gaps.min():.2f} to {gaps.max():.2f} mm between its {n} slices): the "
            f"output grid spaces them evenly at {(along[-1] - along[0]) / (n - 1):.2f} mm from the first to the last "
            f"slice, so slices lie up to {off:.2f} mm from their recorded positions"
        )
    inplane = (pos - pos[0]) - np.outer(along - along[0], normal)  # in-plane drift of each slice's corner
    shift = float(np.linalg.norm(inplane, axis=1).max())
    if shift > 1e-2:
        tilt = float(np.degrees(np.arctan2(shift, along[-1] - along[0])))
        problems.append(
            f"gantry tilt (slices shift in-plane by up to {shift:.2f} mm, about {tilt:.1f} degrees): the output grid "
            "keeps the slice orientation and drops the shear"
        )
    if not problems:
        return None
    return (f"DICOM series '{Path(folder)}' has " + " and ".join(problems)
            + "; resample it to a regular grid first (e.g. with the scanner software or dcm2niix) if that matters")
