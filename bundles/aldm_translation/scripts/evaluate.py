"""Evaluation glue of the ALDM bundle: one item per (case, source, target) and the metrics files.

Protocol (aldm_translation spec §6): every ordered direction ``s != t`` of every test case is
evaluated separately with a fixed direction and the deterministic test preprocessing; PSNR, NMSE
and 3D SSIM (``common.metrics.image``) on ``[0, 1]`` volumes, over the whole model grid and within
the brain mask. Test subjects must not appear in the training or validation lists.

Outputs in ``output_dir``: ``metrics.csv`` (one row per case and direction; with ``histmatch``, the same
metrics of the in-run baseline beside, ``histmatch_<metric>``: the source histogram-matched to the target inside
the mask, which keeps the source's anatomy and is given the target's intensities), ``summary.csv`` and
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

from common.bundle import case_name, check_outputs, load_datalist
from common.metrics.image import nmse, psnr, ssim3d
from common.transforms.intensity import histogram_matched
from common.utils.errors import InvalidInputError
from common.utils.io import atomic_write, refuse_overwrite

from .data import describe_entry
from .outputs import translation_outputs

__all__ = ["direction_datalist", "translation_scores", "TranslationMetricsSaver", "METRICS"]

METRICS = ("psnr", "nmse", "ssim", "psnr_mask", "nmse_mask", "ssim_mask")


def direction_datalist(
    datalist: str,
    modalities: Sequence[str],
    dataset_dir: str,
    split: str = "test",
    disjoint_from: Sequence[str] = ("training", "validation"),
    target_key: str = "target",
    optional: bool = False,
) -> list[dict]:
    """Items ``{"id", "image", <target_key>, ["mask"], "source", "targets": [t]}`` for every direction.

    ``target_key="label"`` makes the target the evaluator's label (validation key metrics).
    Every direction between the modalities of ``modalities`` a case has is evaluated; a case with
    fewer than two of them, or a datalist without ``split`` (unless ``optional``), is refused.

    Raises :class:`common.utils.errors.InvalidInputError` (a ``ValueError``) naming the datalist
    when a case of ``split`` also appears (same ``id``) in ``disjoint_from``, or when a case has
    fewer than two modalities. ``split`` itself is never among ``disjoint_from`` (evaluating the
    ``validation`` subjects checks them against ``training`` only).
    """
    disjoint_from = [k for k in disjoint_from if k != split]
    cases = load_datalist(datalist, split, dataset_dir, path_keys=[*modalities, "mask"], optional=optional)
    if not cases and not os.path.isfile(str(datalist)):
        return []  # checked at the start of `run` (common.bundle.require_cases)
    seen = {
        str(it["id"])
        for key in disjoint_from
        for it in load_datalist(datalist, key, dataset_dir, path_keys=(), optional=True)
        if it.get("id") is not None
    }
    leak = sorted({str(c.get("id")) for c in cases} & seen)
    if leak:
        raise InvalidInputError(
            f"datalist '{datalist}': test subjects also used for training/validation: {leak}; "
            f"'{split}' must not share ids with {list(disjoint_from)}"
        )
    items = []
    for i, case in enumerate(cases):
        case_id = str(case.get("id", f"case_{i:03d}"))
        present = [m for m in modalities if case.get(m)]
        if len(present) < 2:
            raise InvalidInputError(
                f"{describe_entry(i, case, split, datalist)} has {present or 'none'} of the modalities {list(modalities)} "
                f"(config key 'modalities'); expected at least two (a source and a target) to evaluate a translation"
            )
        for s, t in permutations(present, 2):
            item = {"id": case_id, "image": case[s], target_key: case[t], "source": s, "targets": [t]}
            if case.get("mask"):
                item["mask"] = case["mask"]
            items.append(item)
    if not items and not optional:
        raise InvalidInputError(f"no direction to evaluate: '{split}' of datalist '{datalist}' has no case")
    return items


def translation_scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The six numbers of one direction (:data:`METRICS`): PSNR (data range 1), NMSE and 3D SSIM over the whole
    model grid and within ``mask``, with ``pred`` clipped to ``[0, 1]``. The evaluation writes these for ALDM;
    baselines scored with this function are comparable with it."""
    pred = np.clip(np.asarray(pred, dtype=np.float64), 0.0, 1.0)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask) > 0
    return {
        "psnr": psnr(pred, target, data_range=1.0),
        "nmse": nmse(pred, target),
        "ssim": ssim3d(pred, target, data_range=1.0),
        "psnr_mask": psnr(pred, target, data_range=1.0, mask=mask),
        "nmse_mask": nmse(pred, target, mask=mask),
        "ssim_mask": ssim3d(pred, target, data_range=1.0, mask=mask),
    }


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


#: the summary files of an evaluation, in ``output_dir``
SUMMARY_FILES = ("metrics.csv", "summary.json", "summary.csv", "directions.md")


class TranslationMetricsSaver:
    """Ignite handler: metrics per evaluated item, files on completion.

    Reads the decollated evaluator output (``pred`` ``(1, *S)``) and batch (``image``, ``target``,
    optional ``mask``, ``id``, ``source``, ``targets``), all on the model grid. Without a mask the brain mask is
    ``source > 0 or target > 0`` (spec §5: voxels > 0 in any modality).

    Nothing is written before the last item is evaluated (the montage slices are kept in memory), so
    a run stopped by a bad case leaves no partial output; every file is written atomically. Existing
    outputs are refused unless ``overwrite`` (:meth:`check_outputs`, called before any work).
    """

    def __init__(self, output_dir: str, montage: bool = True, overwrite: bool = False, histmatch: bool = True) -> None:
        self.output_dir = str(output_dir)
        self.montage = montage
        self.histmatch = histmatch
        self.overwrite = overwrite
        self.rows: list[dict] = []
        self._montages: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]] = []

    def planned_outputs(self, items: Sequence[dict] = ()) -> list[str]:
        """The files this evaluation writes (the montages of ``items`` included: ``montage/<case>_<s>2<t>.png``,
        two directions of the same case name refused)."""
        out = [os.path.join(self.output_dir, f) for f in SUMMARY_FILES]
        if self.montage:
            out += [str(p) for p in translation_outputs(items, os.path.join(self.output_dir, "montage"), ext=".png")]
        return out

    def check_outputs(self, items: Sequence[dict] = ()) -> None:
        """Before any work: the output folder (config key ``output_dir``) can be written and, unless
        ``overwrite``, none of this evaluation's files exists (:func:`common.bundle.check_outputs`)."""
        check_outputs(self.output_dir, self.overwrite, self.planned_outputs(items))

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self.rows = []
        self._montages = []
        self.check_outputs()

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
            row = {"id": str(case), "source": str(src), "target": str(tgt), **translation_scores(pred, target, mask)}
            if self.histmatch:  # the baseline on the same grid, mask and target, scored by the same function
                base = translation_scores(histogram_matched(source, target, mask), target, mask)
                row.update({f"histmatch_{k}": v for k, v in base.items()})
            self.rows.append(row)
            if self.montage:  # the middle axial slices only; written on completion
                k = source.shape[-1] // 2
                title = f"{case} {src}->{tgt}  PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.3f}"
                name = os.path.join(self.output_dir, "montage", f"{case_name({'id': case})}_{src}2{tgt}.png")
                self._montages.append((name, *(a[..., k : k + 1].copy() for a in (source, pred, target)), title))

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
        for name, source, pred, target, title in self._montages:
            refuse_overwrite(name, self.overwrite)
            _montage(name, source, pred, target, title)
        self._montages = []
        cols = ["id", "source", "target", *METRICS, *([f"histmatch_{m}" for m in METRICS] if self.histmatch else [])]
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
        if self.histmatch:
            lines += ["", "Baseline, the source histogram-matched to the target inside the mask (given the target's "
                      "intensities): mean PSNR mask (dB) / SSIM mask", "", "| direction | model | baseline |", "|---|---|---|"]
            for name, stats in summary.items():
                rows = [r for r in self.rows if name == "all" or f"{r['source']}2{r['target']}" == name]
                base = {m: float(np.nanmean([r[f"histmatch_{m}"] for r in rows])) for m in ("psnr_mask", "ssim_mask")}
                lines.append(f"| {name} | {stats['psnr_mask']['mean']:.2f} / {stats['ssim_mask']['mean']:.3f} | "
                             f"{base['psnr_mask']:.2f} / {base['ssim_mask']:.3f} |")
        with atomic_write(os.path.join(self.output_dir, "directions.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
