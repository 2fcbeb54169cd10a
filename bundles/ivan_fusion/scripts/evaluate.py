"""Evaluation handler: per-slice (paper style) and 3D metrics for synthesis, fusion metrics for fusion."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

import numpy as np
import torch

from common.metrics.fusion import fusion_metrics
from common.metrics.image import nmse, pearson_r, psnr, psnr_per_slice, ssim3d, ssim_per_slice
from common.transforms.ivan import average_fusion, laplacian_maxabs_fusion
from monai.transforms import MapTransform

from common.bundle import case_name
from common.transforms.validation import describe_source
from common.utils.errors import InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

__all__ = ["IVANMetricsHandler", "METRIC_FILES", "CheckSliceSized", "synthesis_rows", "fusion_rows"]

#: the files evaluation writes into ``output_dir`` (refused before any work by ``common.bundle.check_outputs``)
METRIC_FILES = ("metrics_per_slice.csv", "metrics_per_case.csv", "summary.csv")


class CheckSliceSized(MapTransform):
    """Refuse volumes whose slices (the two axes other than ``slice_axis``, after ``Orientationd``) are smaller
    than ``min_size`` in either direction: the per-slice SSIM of the evaluation uses a 7x7 window.
    Raises :class:`InvalidInputError` naming the file and the sizes."""

    def __init__(self, keys, slice_axis: int = 2, min_size: int = 7, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.axis, self.min_size = int(slice_axis) % 3, int(min_size)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            spatial = tuple(int(s) for s in d[key].shape[-3:])
            plane = [s for a, s in enumerate(spatial) if a != self.axis]
            if min(plane) < self.min_size:
                raise InvalidInputError(
                    f"{describe_source(d[key], key)} has slices of {plane[0]}x{plane[1]} voxels (spatial shape "
                    f"{spatial}, slice_axis {self.axis}); evaluation expects at least {self.min_size}x{self.min_size} "
                    f"voxels per slice (the {self.min_size}x{self.min_size} window of the per-slice SSIM)"
                )
        return d


def _np(x) -> np.ndarray:
    return torch.as_tensor(x).detach().cpu().double().numpy()


def synthesis_rows(pred: np.ndarray, target: np.ndarray, name: str, mask: np.ndarray | None = None) -> tuple[list, dict]:
    """Per-slice rows ``{slice, <name>_psnr, _ssim, _mse, _nmse}`` (slices with an all-zero target skipped,
    ``(H, W, D)`` volumes on [0, 1], slices along the last axis) and the 3D metrics of the volume."""
    pred, target = np.clip(pred, 0, 1), np.clip(target, 0, 1)
    ps = psnr_per_slice(pred, target, axis=-1, data_range=1.0)
    ss = ssim_per_slice(pred, target, axis=-1, data_range=1.0)
    rows = []
    for i, idx in enumerate(ps.indices):
        p, t = pred[..., idx], target[..., idx]
        rows.append({
            "slice": int(idx), f"{name}_psnr": float(ps.values[i]), f"{name}_ssim": float(ss.values[i]),
            f"{name}_mse": float(np.mean((p - t) ** 2)), f"{name}_nmse": float(nmse(p, t)),
        })
    case = {
        f"{name}_psnr3d": psnr(pred, target, data_range=1.0),
        # 3D SSIM needs 11 voxels per axis (Gaussian 11^3 window, valid convolution)
        f"{name}_ssim3d": ssim3d(pred, target, data_range=1.0) if min(pred.shape) >= 11 else float("nan"),
        f"{name}_nmse3d": nmse(pred, target),
        f"{name}_slices": int(ps.count),
    }
    if mask is not None:
        case[f"{name}_psnr3d_mask"] = psnr(pred, target, data_range=1.0, mask=mask > 0)
        # contrast check: a prediction of the mean intensity scores well in PSNR but near 0 here
        case[f"{name}_r_mask"] = pearson_r(pred, target, mask=mask > 0)
    return rows, case


def fusion_rows(a: np.ndarray, b: np.ndarray, fused: np.ndarray, name: str, ag_variant: str = "standard") -> list:
    """Per-slice fusion metrics ``<name>_{ag,sf,en,qmi,qabf,piella_q}`` on slices where a source is non-zero."""
    rows = []
    for idx in range(fused.shape[-1]):
        sa, sb = a[..., idx], b[..., idx]
        if not (np.any(sa) or np.any(sb)):
            continue
        m = fusion_metrics(sa, sb, np.clip(fused[..., idx], 0, 1), scale=255.0, ag_variant=ag_variant)
        rows.append({"slice": idx, **{f"{name}_{k}": float(v) for k, v in m.items()}})
    return rows


def _merge(rows_by_name: Sequence[list]) -> list:
    merged: dict[int, dict] = {}
    for rows in rows_by_name:
        for r in rows:
            merged.setdefault(r["slice"], {"slice": r["slice"]}).update(r)
    return [merged[k] for k in sorted(merged)]


def _write_csv(path: str, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


class IVANMetricsHandler:
    """Collect metrics per case while an evaluator runs; write three CSV files when it completes.

    The evaluator's ``pred`` must be the predictor output of ``direction="both"`` in the preprocessed space:
    ``n_out`` predicted targets then ``n_in`` reconstructed sources, ``(C, H, W, D)``, slices along ``slice_axis``.

    Synthesis: per-slice PSNR (= the code's ``peak_signal_noise_ratio(255 y, 255 y_hat, 255)``), SSIM
    (scikit-image defaults), MSE, NMSE for each target and each reconstructed source (``rev_<m>``), and 3D
    PSNR / SSIM (Gaussian 11^3) / NMSE per case (plus PSNR and the Pearson r in ``mask_key`` if present). Fusion (target ``fused``):
    AG, SF, EN, QMI, Q^AB/F and Piella's Q of the network output (``ivan``), of the reference rule
    (``reference``, Laplacian max-abs) and of the average of the sources (``average``), plus PSNR/SSIM of the
    network output against the reference.

    Writes ``metrics_per_slice.csv``, ``metrics_per_case.csv`` and ``summary.csv`` (mean over slices, resp.
    cases, and counts) into ``output_dir``, each atomically; an existing file is refused (before any of the
    three is written) unless ``overwrite``.
    """

    def __init__(
        self,
        output_dir: str,
        inputs: Sequence[str],
        targets: Sequence[str],
        slice_axis: int = 2,
        mask_key: str | None = "mask",
        fusion_levels: int = 4,
        ag_variant: str = "standard",
        id_key: str = "id",
        overwrite: bool = False,
    ) -> None:
        self.output_dir, self.inputs, self.targets = output_dir, list(inputs), list(targets)
        self.overwrite = bool(overwrite)
        self.axis = int(slice_axis) % 3
        self.mask_key, self.fusion_levels, self.ag_variant, self.id_key = mask_key, int(fusion_levels), ag_variant, id_key
        self.is_fusion = self.targets == ["fused"]
        self.slice_rows: list[dict] = []
        self.case_rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _vol(self, x) -> np.ndarray:
        """``(1, H, W, D)`` or ``(H, W, D)`` -> ``(a, b, S)`` with the slices last."""
        v = _np(x)
        v = v[0] if v.ndim == 4 else v
        return np.moveaxis(v, self.axis, -1)

    def evaluate_case(self, case: str, batch: dict, pred) -> None:
        n_out = len(self.targets)
        p = _np(pred)
        outs = {m: np.moveaxis(p[j], self.axis, -1) for j, m in enumerate(self.targets)}
        recs = {m: np.moveaxis(p[n_out + j], self.axis, -1) for j, m in enumerate(self.inputs) if n_out + j < p.shape[0]}
        sources = {m: self._vol(batch[m]) for m in self.inputs if m in batch}
        mask = self._vol(batch[self.mask_key]) if self.mask_key and self.mask_key in batch else None
        per_slice, case_row = [], {"case": case}
        for m, vol in outs.items():
            if m in batch:
                rows, c = synthesis_rows(vol, self._vol(batch[m]), m, mask)
                per_slice.append(rows)
                case_row.update(c)
        for m, vol in recs.items():
            if m in sources:
                rows, c = synthesis_rows(vol, sources[m], f"rev_{m}", mask)
                per_slice.append(rows)
                case_row.update(c)
        if self.is_fusion and len(sources) == 2:
            a, b = (sources[m] for m in self.inputs)
            src = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2)  # (2, S, a, b)
            ref = laplacian_maxabs_fusion(src, self.fusion_levels).permute(1, 2, 0).numpy()
            avg = average_fusion(src).permute(1, 2, 0).numpy()
            for name, f in (("ivan", outs["fused"]), ("reference", ref), ("average", avg)):
                per_slice.append(fusion_rows(a, b, f, name, self.ag_variant))
        for r in _merge(per_slice):
            self.slice_rows.append({"case": case, **r})
        self.case_rows.append(case_row)

    def iteration_completed(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # not decollated: one case per batch
            batch, output = [{k: v[0] for k, v in batch.items()}], [{"pred": output["pred"][0]}]
        for b, o in zip(batch, output):
            case = case_name(b, len(self.case_rows), self.id_key, self.inputs[:1])
            self.evaluate_case(case, b, o["pred"])

    def summary(self) -> list[dict]:
        rows = []
        for source, table in (("per_slice", self.slice_rows), ("per_case", self.case_rows)):
            cols = []
            for r in table:
                cols += [k for k in r if k not in cols and k not in ("case", "slice")]
            for k in cols:
                vals = [r[k] for r in table if k in r and isinstance(r[k], (int, float)) and math.isfinite(r[k])]
                if vals:
                    rows.append({"metric": k, "level": source, "mean": float(np.mean(vals)),
                                 "std": float(np.std(vals)), "count": len(vals)})
        return rows

    def completed(self, engine=None) -> None:
        import os

        os.makedirs(self.output_dir, exist_ok=True)
        for name in METRIC_FILES:
            refuse_overwrite(os.path.join(self.output_dir, name), self.overwrite)
        _write_csv(os.path.join(self.output_dir, "metrics_per_slice.csv"), self.slice_rows)
        _write_csv(os.path.join(self.output_dir, "metrics_per_case.csv"), self.case_rows)
        _write_csv(os.path.join(self.output_dir, "summary.csv"), self.summary())
