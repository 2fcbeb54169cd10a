"""Evaluation glue of the ALDM bundle: one item per (case, source, target) and the metrics files.

Protocol (aldm_translation spec §6): every ordered direction ``s != t`` of every test case is
evaluated separately with a fixed direction and the deterministic test preprocessing; PSNR, NMSE
and 3D SSIM (``common.metrics.image``) on ``[0, 1]`` volumes, over the whole model grid and within
the brain mask. Test subjects must not appear in the training or validation lists.

Outputs in ``output_dir``: ``metrics.csv`` (one row per case and direction), ``summary.csv`` and
``summary.json`` (mean and std per direction and overall), ``directions.md`` (per-direction
table), ``montage/<case>_<s>2<t>.png`` (source, generated, target, absolute error).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from itertools import permutations

import numpy as np
import torch
from monai.data import load_decathlon_datalist

from common.metrics.image import nmse, psnr, ssim3d
from common.utils.io import atomic_write

__all__ = ["direction_datalist", "TranslationMetricsSaver", "METRICS"]

METRICS = ("psnr", "nmse", "ssim", "psnr_mask", "nmse_mask", "ssim_mask")


def direction_datalist(
    datalist: str,
    modalities: Sequence[str],
    dataset_dir: str,
    split: str = "test",
    disjoint_from: Sequence[str] = ("training", "validation"),
    target_key: str = "target",
) -> list[dict]:
    """Items ``{"id", "image", <target_key>, ["mask"], "source", "targets": [t]}`` for every direction.

    ``target_key="label"`` makes the target the evaluator's label (validation key metrics).

    Raises ``ValueError`` when a case of ``split`` also appears (same ``id``) in ``disjoint_from``.
    """
    if not os.path.isfile(datalist):
        return []  # checked at the start of `run` (scripts.aldm.require_items)
    with open(datalist) as fh:
        raw = json.load(fh)
    seen = {str(it.get("id")) for key in disjoint_from for it in raw.get(key, []) if it.get("id") is not None}
    cases = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=split, base_dir=dataset_dir)
    leak = sorted({str(c.get("id")) for c in raw.get(split, [])} & seen)
    if leak:
        raise ValueError(f"test subjects also used for training/validation: {leak}")
    items = []
    for i, (case, entry) in enumerate(zip(cases, raw[split])):
        # the raw id: load_decathlon_datalist joins any value naming an existing path to base_dir
        case_id = str(entry.get("id", f"case_{i:03d}"))
        present = [m for m in modalities if m in case]
        for s, t in permutations(present, 2):
            item = {"id": case_id, "image": case[s], target_key: case[t], "source": s, "targets": [t]}
            if case.get("mask"):
                item["mask"] = case["mask"]
            items.append(item)
    if not items:
        raise ValueError(f"no direction to evaluate: '{split}' of {datalist} has no case with two of {list(modalities)}")
    return items


def _montage(path: str, source: np.ndarray, pred: np.ndarray, target: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = source.shape[-1] // 2  # middle axial slice (RAS: last axis is inferior-superior)
    panels = [("source", source), ("generated", pred), ("target", target), ("|error|", np.abs(pred - target))]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (name, vol) in zip(axes, panels):
        ax.imshow(np.rot90(vol[..., k]), cmap="gray" if name != "|error|" else "magma", vmin=0.0, vmax=1.0 if name != "|error|" else 0.5)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)


class TranslationMetricsSaver:
    """Ignite handler: metrics per evaluated item, files on completion.

    Reads the decollated evaluator output (``pred`` ``(1, *S)``) and batch (``image``, ``target``,
    optional ``mask``, ``id``, ``source``, ``targets``), all on the model grid. Without a mask the brain mask is
    ``source > 0 or target > 0`` (spec §5: voxels > 0 in any modality).
    """

    def __init__(self, output_dir: str, montage: bool = True, overwrite: bool = False) -> None:
        self.output_dir = str(output_dir)
        self.montage = montage
        self.overwrite = overwrite
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self.rows = []
        os.makedirs(self.output_dir, exist_ok=True)
        target = os.path.join(self.output_dir, "metrics.csv")
        if os.path.exists(target) and not self.overwrite:
            raise FileExistsError(f"output '{target}' already exists; set 'overwrite' to true to replace it")

    @staticmethod
    def _np(x) -> np.ndarray:
        return (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(np.float64)

    def _iteration(self, engine) -> None:
        for out, item in zip(engine.state.output, engine.state.batch):
            pred = np.clip(self._np(out["pred"])[0], 0.0, 1.0)
            target = self._np(item["target"])[0]
            source = self._np(item["image"])[0]
            mask = self._np(item["mask"])[0] > 0 if "mask" in item else (source > 0) | (target > 0)
            src = item["source"][0] if isinstance(item["source"], (list, tuple)) else item["source"]
            tgt = item["targets"][0]
            tgt = tgt[0] if isinstance(tgt, (list, tuple)) else tgt
            case = item["id"][0] if isinstance(item["id"], (list, tuple)) else item["id"]
            row = {
                "id": str(case),
                "source": str(src),
                "target": str(tgt),
                "psnr": psnr(pred, target, data_range=1.0),
                "nmse": nmse(pred, target),
                "ssim": ssim3d(pred, target, data_range=1.0),
                "psnr_mask": psnr(pred, target, data_range=1.0, mask=mask),
                "nmse_mask": nmse(pred, target, mask=mask),
                "ssim_mask": ssim3d(pred, target, data_range=1.0, mask=mask),
            }
            self.rows.append(row)
            if self.montage:
                folder = os.path.join(self.output_dir, "montage")
                os.makedirs(folder, exist_ok=True)
                title = f"{case} {src}->{tgt}  PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.3f}"
                _montage(os.path.join(folder, f"{case}_{src}2{tgt}.png"), source, pred, target, title)

    def summary(self) -> dict:
        """``{"<s>2<t>": {metric: {"mean", "std", "n"}}, ..., "all": ...}``."""
        groups: dict[str, list[dict]] = {}
        for r in self.rows:
            groups.setdefault(f"{r['source']}2{r['target']}", []).append(r)
        groups["all"] = list(self.rows)
        out = {}
        for name, rows in groups.items():
            out[name] = {}
            for m in METRICS:
                v = np.array([r[m] for r in rows], dtype=np.float64)
                out[name][m] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "n": int(np.isfinite(v).sum())}
        return out

    def _completed(self, engine) -> None:
        cols = ["id", "source", "target", *METRICS]
        with atomic_write(os.path.join(self.output_dir, "metrics.csv"), "w") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(self.rows)
        summary = self.summary()
        with atomic_write(os.path.join(self.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        with atomic_write(os.path.join(self.output_dir, "summary.csv"), "w") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["direction", "n", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")]])
            for name, stats in summary.items():
                w.writerow([name, stats["psnr"]["n"], *[f"{stats[m][s]:.6g}" for m in METRICS for s in ("mean", "std")]])
        lines = [
            "| direction | n | PSNR (dB) | NMSE | SSIM | PSNR mask (dB) | NMSE mask | SSIM mask |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, stats in summary.items():
            cells = [f"{stats[m]['mean']:.4g} ± {stats[m]['std']:.2g}" for m in METRICS]
            lines.append(f"| {name} | {stats['psnr']['n']} | " + " | ".join(cells) + " |")
        with atomic_write(os.path.join(self.output_dir, "directions.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
