"""Evaluation outputs of noddi_sr: per-case metrics CSV, per-method summary, PNG montages (spec §6).

Per map (NDI, ODI, FWF) and mask (brain, WM, GM): PSNR = 10 log10(1 / MSE) over the mask (data range 1), 3D SSIM
(Gaussian 11³, σ 1.5, averaged over the mask cropped by the kernel radius) and MAE, from :mod:`common.metrics.image`.
Per case the CLDM-compatible numbers (all three maps flattened, background included, data range from the reference;
PSNR of scikit-image and the 1-D ``flat_ssim``) go on a row with map ``all`` and mask ``none``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.bundle import case_name
from common.metrics.image import flat_ssim, mae, psnr, ssim3d
from common.utils.io import atomic_write, refuse_overwrite

__all__ = ["MAP_NAMES", "case_metrics", "NODDIEvaluationHandler", "write_montage", "montage_names", "COLUMNS"]

MAP_NAMES = ("NDI", "ODI", "FWF")
COLUMNS = ["case", "method", "map", "mask", "psnr", "ssim", "mae", "n_voxels"]


def _np(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def case_metrics(pred: np.ndarray, ref: np.ndarray, masks: dict[str, np.ndarray], case: str, method: str) -> list[dict]:
    """Rows of the per-case CSV for maps (3, X, Y, Z) against the reference and boolean masks (X, Y, Z)."""
    rows = []
    for c, name in enumerate(MAP_NAMES):
        for mname, m in masks.items():
            n = int(m.sum())
            if n == 0:
                continue
            rows.append(
                {
                    "case": case,
                    "method": method,
                    "map": name,
                    "mask": mname,
                    "psnr": psnr(pred[c], ref[c], data_range=1.0, mask=m),
                    "ssim": ssim3d(pred[c], ref[c], data_range=1.0, mask=m) if min(pred.shape[1:]) > 10 else float("nan"),
                    "mae": mae(pred[c], ref[c], mask=m),
                    "n_voxels": n,
                }
            )
    flat_pred = np.moveaxis(pred, 0, -1).reshape(-1, 3)
    flat_ref = np.moveaxis(ref, 0, -1).reshape(-1, 3)
    r = float(flat_ref.max() - flat_ref.min()) or 1.0
    rows.append(
        {
            "case": case,
            "method": method,
            "map": "all",
            "mask": "none (CLDM-compatible)",
            "psnr": psnr(flat_pred, flat_ref, data_range=r),
            "ssim": flat_ssim(flat_pred, flat_ref, data_range=r, channel_axis=1),
            "mae": mae(flat_pred, flat_ref),
            "n_voxels": int(flat_ref.shape[0]),
        }
    )
    return rows


def write_montage(path: str | os.PathLike, columns: dict[str, np.ndarray], axis: int = 2, overwrite: bool = True) -> Path:
    """PNG: one row per map, one column per named volume (3, X, Y, Z), middle slice along ``axis``.

    Written atomically; an existing file is refused unless ``overwrite``.
    """
    refuse_overwrite(path, overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(3, len(names), figsize=(2.6 * len(names), 7.5), squeeze=False)
    for j, name in enumerate(names):
        vol = columns[name]
        k = vol.shape[axis + 1] // 2
        for i, mname in enumerate(MAP_NAMES):
            sl = np.take(vol[i], k, axis=axis)
            is_err = name.startswith("|")
            axes[i, j].imshow(np.rot90(sl), cmap="magma" if is_err else "gray", vmin=0.0, vmax=0.3 if is_err else 1.0)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(mname)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return path


#: the image a case is named after when it has no id: the datalist's DWI, or the loaded series (``image``)
_CASE_IMAGES = ("dwi", "image")


def montage_names(data: list, n_montages: int, case_key: str = "id") -> list[str]:
    """The montage files :class:`NODDIEvaluationHandler` writes for the first ``n_montages`` cases."""
    cases = list(data)[: max(int(n_montages), 0)]
    return [f"montage_{case_name(c, i, id_key=case_key, image_keys=_CASE_IMAGES)}.png" for i, c in enumerate(cases)]


class NODDIEvaluationHandler:
    """Collect per-case metrics during an evaluator run; write CSV, summary and montages when it completes.

    Reads from each decollated output item: ``pred_key`` (3, X, Y, Z) maps, ``label_key`` reference maps,
    ``brain_key``/``wm_key``/``gm_key`` HR masks, ``case_key`` the case id; optionally ``lowres_key`` (a low-resolution
    fit resampled to the HR grid) for the montage.

    Files: ``<output_dir>/metrics.csv`` (columns :data:`COLUMNS`), ``summary.json`` and ``summary.csv`` (mean and std
    per method, map and mask), ``montage_<case>.png`` for the first ``n_montages`` cases; each written atomically, and
    refused when it exists unless ``overwrite`` (the configs check them all before the run starts too).
    """

    def __init__(
        self,
        output_dir: str,
        method: str = "noddi_sr",
        pred_key: str = "pred",
        label_key: str = "label",
        brain_key: str = "mask_hr",
        wm_key: str = "wm",
        gm_key: str = "gm",
        case_key: str = "id",
        lowres_key: str | None = "lowres_fit",
        n_montages: int = 3,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = method
        self.keys = dict(pred=pred_key, label=label_key, brain=brain_key, wm=wm_key, gm=gm_key, case=case_key)
        self.lowres_key, self.n_montages = lowres_key, int(n_montages)
        self.overwrite = bool(overwrite)
        self.rows: list[dict] = []
        self._n = 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _reset(self, engine=None) -> None:
        self.rows, self._n = [], 0

    def add_case(self, item: dict) -> None:
        k = self.keys
        pred, ref = _np(item[k["pred"]]).astype(np.float64), _np(item[k["label"]]).astype(np.float64)
        masks = {"brain": _np(item[k["brain"]])[0] > 0}
        for name in ("wm", "gm"):
            if k[name] in item and not isinstance(item[k[name]], str):
                masks[name] = _np(item[k[name]])[0] > 0
        case = case_name(item, self._n, id_key=k["case"], image_keys=_CASE_IMAGES)
        self.rows += case_metrics(pred, ref, masks, case, self.method)
        if self._n < self.n_montages:
            cols = {}
            if self.lowres_key and self.lowres_key in item and not isinstance(item[self.lowres_key], str):
                cols["low-res fit"] = _np(item[self.lowres_key])
            cols["ours"] = pred
            cols["reference"] = ref
            cols["|ours - ref|"] = np.abs(pred - ref)
            write_montage(self.output_dir / f"montage_{case}.png", cols, overwrite=self.overwrite)
        self._n += 1

    def iteration_completed(self, engine) -> None:
        out = engine.state.output
        out = out if isinstance(out, list) else [out]
        batch = engine.state.batch
        batch = batch if isinstance(batch, list) else [batch] * len(out)
        for b, o in zip(batch, out):
            item = dict(b) if isinstance(b, dict) else {}
            item.update(o)  # the prediction and the label after postprocessing; masks and ids from the batch
            self.add_case(item)

    def summary(self) -> list[dict]:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.rows:
            groups[(r["method"], r["map"], r["mask"])].append(r)
        out = []
        for (method, m, mask), rows in groups.items():
            entry = {"method": method, "map": m, "mask": mask, "n_cases": len(rows)}
            for metric in ("psnr", "ssim", "mae"):
                vals = np.array([r[metric] for r in rows], dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                entry[f"{metric}_mean"] = float(vals.mean()) if vals.size else math.nan
                entry[f"{metric}_std"] = float(vals.std()) if vals.size else math.nan
            out.append(entry)
        return out

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "summary.json", "summary.csv"):
            refuse_overwrite(self.output_dir / name, self.overwrite)
        with atomic_write(self.output_dir / "metrics.csv", "w") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        summ = self.summary()
        with atomic_write(self.output_dir / "summary.json", "w") as fh:
            json.dump(summ, fh, indent=2)
        if summ:
            with atomic_write(self.output_dir / "summary.csv", "w") as fh:
                w = csv.DictWriter(fh, fieldnames=list(summ[0]))
                w.writeheader()
                w.writerows(summ)

    def completed(self, engine=None) -> None:
        self.write()
