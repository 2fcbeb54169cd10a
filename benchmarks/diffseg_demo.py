#!/usr/bin/env python
"""The shipped diffseg demo models on the held-out real CT and its reframings, samplers, curves.

Everything runs through the bundle's own default configs with only the demo overlay
(``inference.json`` + ``evaluate.json`` + ``demo.json``; the baseline adds
``train_baseline.json``), as a user runs them:

1. **Quality and framing**: the diffusion model (5-step DDPM sampler) and its non-diffusion twin
   on the cases of :func:`common.data.demo.build_ct_framings` (the original TotalSegmentator
   example CT, the CT in a 1.5x field of view padded with air, a 60 mm slab, that slab in a 1.5x
   field of view, TotalSegmentator's own 30-slice crop with its own labels): per-case mean Dice
   over the 6 foreground classes, per-class Dice, HD95 and NSD (1 mm) from ``evaluate.json``'s
   ``metrics_per_case.csv`` (computed on the model's grid, ``pixdim`` of demo.json), seconds per case, and Dice of the
   written predictions against the reference labels on each input's own (3 mm) grid.
2. **Samplers** (``--samplers``): on the original CT, the 5-step DDPM sampler against DDIM (5
   steps, eta 0) and the 1000-step DDPM chain (the linear schedule resampled to 1000 steps),
   Dice and seconds per volume, one run.
3. **Runtimes** (``--runtimes``): the models of ``--models`` on every case with the network passes in eager
   PyTorch (``runtime: torch``), PyTorch with bfloat16 rounding at every convolution (emulated in float32 on
   any CPU: the change of Dice that bfloat16 costs), OpenVINO float32 (``openvino``, what ``runtime: auto`` picks on a CPU
   with OpenVINO installed) and OpenVINO bfloat16 (which OpenVINO runs in float32 on a CPU without bfloat16
   units; the results say which it used): mean Dice, its change against PyTorch, and seconds per case.
4. **Window growth** (``--window-growth F [F ...]``): both models on every case with windows grown to cover each axis
   up to F windows long (``max_window_fraction``, opt-in on a CPU: fewer voxels per step, not exact), mean Dice and
   its change against the default (1: windows never grow), and seconds per case.
5. **Learning curves** (``--train-dirs``): training loss and validation Dice against iteration
   from the TensorBoard files of the two training runs, as one PNG.

Usage (from the repository root)::

    python benchmarks/diffseg_demo.py --out runs/diffseg_demo_eval --samplers \\
        --train-dirs runs/diffseg_demo/diffusion/outputs runs/diffseg_demo/baseline/outputs

Prints one JSON document (also ``<out>/results.json``, the card's tables in ``<out>/results.md``;
the curves go to ``<out>/learning_curves.png``). The labels are TotalSegmentator model outputs merged to 6 organ
groups (regression references, not manual ground truth).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "diffseg"
FOREGROUND = ["liver", "spleen", "kidney", "bowel", "urinary_bladder", "bone"]


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (nearest even) and held in float32."""
    return t.to(torch.bfloat16).to(t.dtype)


@contextlib.contextmanager
def bf16_rounding(network: torch.nn.Module):
    """Every convolution and linear layer of ``network`` computes as bfloat16 units do, emulated in float32.

    Input and weight are rounded to bfloat16, the products are accumulated in float32 (as AVX-512 BF16 / AMX and
    OpenVINO's bf16 kernels do), and the output is rounded to bfloat16 again; everything between (norms,
    activations, the sampler) stays float32. It runs at float32 speed on any CPU, so the change of Dice that
    bfloat16 costs can be measured on a machine without bfloat16 units (where PyTorch's own bf16 convolutions take
    a slow reference path: more than 3 minutes for one case of the demo model)."""
    layers = (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Linear)
    handles, originals = [], {}

    def pre(module, args):
        # rounded at the first pass, after the checkpoint is loaded; the float32 weights come back on exit
        if module not in originals:
            originals[module] = module.weight.data
            module.weight.data = _to_bf16(module.weight.data)
        return (_to_bf16(args[0]), *args[1:])

    for m in network.modules():
        if isinstance(m, layers):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(lambda m, a, out: _to_bf16(out))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, weight in originals.items():
            module.weight.data = weight


def evaluate(model: str, datalist: Path, out: Path, ckpt_path: str | None = None, bf16: bool = False,
             **overrides) -> dict:
    """Run ``evaluate.json`` (+ the demo overlay) on every ``test`` case of ``datalist``.

    ``bf16`` runs the network passes with bfloat16 rounding (:func:`bf16_rounding`; use it with ``runtime: torch``),
    so the change of Dice can be measured even where OpenVINO cannot run bfloat16. With OpenVINO, the arithmetic
    it actually compiled with is returned under the key ``"precision_used"`` (a CPU without bfloat16 units runs a
    ``bf16`` request in float32)."""
    from monai.bundle import ConfigWorkflow

    files = ["inference.json", "evaluate.json"] + (["train_baseline.json"] if model == "baseline" else []) + ["demo.json"]
    if ckpt_path:
        overrides["ckpt_path"] = ckpt_path
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist.parent),
        datalist_file=str(datalist),
        output_dir=str(out),
        overwrite=True,
        **overrides,
    )
    wf.initialize()
    seconds: list[float] = []
    evaluator = wf.parser.get_parsed_content("evaluator")
    from ignite.engine import Events

    clock = {}
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda e: clock.update(t=time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seconds.append(time.perf_counter() - clock["t"]))
    with bf16_rounding(wf.parser.get_parsed_content("network")) if bf16 else contextlib.nullcontext():
        wf.run()
    compiled = getattr(wf.parser.get_parsed_content("inferer"), "_compiled", None)
    wf.finalize()
    metrics = read_metrics(out / "metrics_per_case.csv", seconds)
    if compiled is not None:
        metrics["precision_used"] = compiled.precision_used
    return metrics


def compare(model: str, datalist: Path, out: Path, ckpt_path: str | None, settings, reference: str,
            delta_key: str) -> tuple[dict, dict]:
    """``model`` evaluated under each ``(name, overrides)`` of ``settings``: per setting and case, mean Dice, seconds,
    and under ``delta_key`` the change of Dice against the setting named ``reference``; with the arithmetic OpenVINO
    compiled with, per setting that ran OpenVINO."""
    runs, used = {}, {}
    for name, over in settings:
        res = evaluate(model, datalist, out / name.replace(" ", "_"), ckpt_path, **over)
        if "precision_used" in res:
            used[name] = res.pop("precision_used")
        runs[name] = {case: {"mean_dice": v["mean_dice"], "seconds": v.get("seconds")} for case, v in res.items()}
    for cases in runs.values():
        for case, v in cases.items():
            v[delta_key] = round(v["mean_dice"] - runs[reference][case]["mean_dice"], 4)
    return runs, used


def read_metrics(path: Path, seconds: list[float]) -> dict:
    """Per case: mean over the foreground classes present in its reference, and per class."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    cases: dict[str, dict] = {}
    for r in rows:
        case = cases.setdefault(r["case"], {"per_class": {}})
        dice = float(r["dice"])
        if dice == dice:  # classes absent from the reference give NaN and are left out
            case["per_class"][r["name"]] = {"dice": dice, "hd95_mm": float(r["hd95"]), "nsd_1mm": float(r["nsd"])}
    for i, (name, case) in enumerate(cases.items()):
        pc = case["per_class"]
        case["mean_dice"] = sum(v["dice"] for v in pc.values()) / len(pc)
        case["min_dice"] = min(v["dice"] for v in pc.values())
        finite = [v["hd95_mm"] for v in pc.values() if v["hd95_mm"] == v["hd95_mm"] and v["hd95_mm"] != float("inf")]
        case["mean_hd95_mm"] = sum(finite) / max(len(finite), 1)
        nsd = [v["nsd_1mm"] for v in pc.values() if v["nsd_1mm"] == v["nsd_1mm"]]  # NaN: nothing predicted
        case["mean_nsd_1mm"] = sum(nsd) / max(len(nsd), 1)
        if i < len(seconds):
            case["seconds"] = round(seconds[i], 2)
    return cases


def native_grid_dice(datalist: Path, out: Path) -> dict:
    """Dice of the written predictions (in each input's own geometry) against the reference
    labels on the input grid: the number a user computes from the output files."""
    import nibabel as nib
    import numpy as np

    result = {}
    for case in json.loads(datalist.read_text())["test"]:
        pred = next((out / case["id"]).glob("*_seg.nii.gz"))
        p = np.asarray(nib.load(str(pred)).dataobj)
        g = np.asarray(nib.load(str(datalist.parent / case["label"])).dataobj)
        result[case["id"]] = case_dice(p, g)
    return result


def case_dice(pred, ref) -> dict:
    """Dice per foreground class in the reference or the prediction (a class only one of them has
    scores 0; one neither has is left out) and their mean, as ``evaluate.json`` counts them."""
    from common.metrics.segmentation import dice

    per = {name: dice(pred == c, ref == c) for c, name in enumerate(FOREGROUND, start=1)}
    per = {k: v for k, v in per.items() if v == v}
    return {"mean_dice": sum(per.values()) / len(per), "per_class": per}


def learning_curves(train_dirs: list[str], png: Path, epoch_length: int = 200) -> dict:
    """Training loss (mean of each 50 iterations) and validation Dice from TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for folder in train_dirs:
        name = "baseline" if "baseline" in folder else "diffusion"
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        loss_tag = next((t for t in tags if t in ("loss", "train_loss")), None) or next(t for t in tags if "loss" in t)
        loss = [(e.step, e.value) for e in acc.Scalars(loss_tag)]
        val_tag = next(t for t in tags if "dice" in t.lower())
        val = [(e.step, e.value) for e in acc.Scalars(val_tag)]
        block = 50
        smooth = [
            (loss[i + block - 1][0], sum(v for _, v in loss[i : i + block]) / block) for i in range(0, len(loss) - block + 1, block)
        ]
        val_iter = [(s * epoch_length, v) for s, v in val]  # validation is logged per epoch
        curves[name] = {"loss": smooth, "val_dice_nobg": val_iter}
        ax_loss.plot(*zip(*smooth), label=name)
        ax_val.plot(*zip(*val_iter), marker="o", label=name)
    ax_loss.set(xlabel="iteration", ylabel="training loss (Dice + CE, mean of 50)", yscale="log", title="training loss")
    ax_val.set(xlabel="iteration", ylabel="validation mean Dice (no background)", title="validation (2 held-out deformed CTs)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return curves


CASE_TITLES = {
    "example": "original CT (122x101x112 at 3 mm)",
    "example_fov150": "in a 1.5x field of view, air-padded",
    "example_slab60": "60 mm slab",
    "example_slab60_fov150": "60 mm slab in a 1.5x field of view",
    "example_ct_sm": "TotalSegmentator's 30-slice crop, its own labels",
}


# the network runtimes of --runtimes: (name, evaluate() options); "torch" is the reference of every other
RUNTIMES = (
    ("torch", {"runtime": "torch"}),
    ("torch bf16 (emulated)", {"runtime": "torch", "bf16": True}),
    ("openvino f32", {"runtime": "openvino", "runtime_precision": "f32"}),
    ("openvino bf16", {"runtime": "openvino", "runtime_precision": "bf16"}),
)


def comparison_markdown(model: str, runs: dict, delta_key: str, column: str) -> list[str]:
    """One table of :func:`compare`'s ``runs``: per case, mean Dice (its change against the reference) and seconds
    for each setting; ``column`` formats a setting's name into its column title."""
    names = list(runs)
    lines = [f"| {model}: case | " + " | ".join(column.format(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    for case, title in CASE_TITLES.items():
        cells = [f"{runs[n][case]['mean_dice']:.4f} ({runs[n][case][delta_key]:+.4f}), "
                 f"{runs[n][case].get('seconds') or float('nan'):.1f}" for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def runtime_markdown(results: dict, key: str = "runtimes") -> list[str]:
    """Mean Dice (change against PyTorch) and seconds per case for each network runtime (``key``: ``runtimes``, the
    diffusion model, or ``runtimes_baseline``)."""
    model = "baseline" if key.endswith("baseline") else "diffusion"
    lines = comparison_markdown(model, results[key], "dice_minus_torch", "{}: Dice (vs torch), s")
    used = results.get(key.replace("runtimes", "runtime_precision_used")) or {}
    notes = [f"{n} ran in {p}" for n, p in used.items() if not n.endswith(p)]
    return lines + ([f"Arithmetic OpenVINO compiled with: {'; '.join(notes)} (this CPU has no bfloat16 units)."]
                    if notes else []) + [""]


def growth_markdown(results: dict) -> list[str]:
    """Mean Dice (change against windows that never grow) and seconds per case for each ``max_window_fraction``."""
    lines = []
    for model, runs in results["window_growth"].items():
        lines += comparison_markdown(model, runs, "dice_minus_default", "max_window_fraction {}: Dice (change), s") + [""]
    return lines


def markdown(results: dict) -> str:
    """The card's tables from ``results``."""
    lines = [line for key in ("runtimes", "runtimes_baseline") if key in results for line in runtime_markdown(results, key)]
    lines += growth_markdown(results) if "window_growth" in results else []
    if "diffusion" not in results or "baseline" not in results:
        return "\n".join(lines) + "\n"
    d, b = results["diffusion"], results["baseline"]
    dn, bn = results["diffusion_native_grid"], results["baseline_native_grid"]
    lines += [
        "| case | diffusion mean Dice | lowest organ | baseline mean Dice | difference | diffusion HD95 (mm) | diffusion NSD 1 mm | "
        "Dice on the input grid (diffusion / baseline) | seconds (diffusion / baseline) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, title in CASE_TITLES.items():
        low = min(d[case]["per_class"].items(), key=lambda kv: kv[1]["dice"])
        lines.append(
            f"| {title} | {d[case]['mean_dice']:.3f} | {low[0]} {low[1]['dice']:.3f} | {b[case]['mean_dice']:.3f} | "
            f"{d[case]['mean_dice'] - b[case]['mean_dice']:+.3f} | {d[case]['mean_hd95_mm']:.1f} | {d[case]['mean_nsd_1mm']:.3f} | "
            f"{dn[case]['mean_dice']:.3f} / {bn[case]['mean_dice']:.3f} | {d[case].get('seconds', float('nan')):.1f} / "
            f"{b[case].get('seconds', float('nan')):.1f} |"
        )
    lines += ["", "| organ (original CT) | diffusion Dice | HD95 (mm) | NSD 1 mm | baseline Dice | HD95 (mm) | NSD 1 mm |", "|---|---|---|---|---|---|---|"]
    for organ in FOREGROUND:
        x, y = d["example"]["per_class"][organ], b["example"]["per_class"][organ]
        lines.append(
            f"| {organ} | {x['dice']:.3f} | {x['hd95_mm']:.1f} | {x['nsd_1mm']:.3f} | {y['dice']:.3f} | {y['hd95_mm']:.1f} | {y['nsd_1mm']:.3f} |"
        )
    if "sampling" in results:
        lines += ["", "| sampler (original CT) | mean Dice | difference to 5-step DDPM | seconds per volume | time ratio |", "|---|---|---|---|---|"]
        for name, v in results["sampling"].items():
            lines.append(f"| {name} | {v['mean_dice']:.4f} | {v['dice_minus_5_step']:+.4f} | {v['seconds']:.1f} | {v['time_ratio_to_5_step']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diffseg_demo_eval")
    ap.add_argument("--diffusion-ckpt", default=None, help="default: the shipped models/demo/model.pt")
    ap.add_argument("--baseline-ckpt", default=None, help="default: the shipped models/demo/baseline.pt")
    ap.add_argument("--samplers", action="store_true", help="also time DDIM and the 1000-step chain on the original CT")
    ap.add_argument("--chain-steps", type=int, default=1000,
                    help="steps of the long DDPM chain of --samplers (0: leave it out; 1000 takes about 30 min on one core)")
    ap.add_argument("--runtimes", action="store_true", help="also run the models of --models with each network runtime")
    ap.add_argument("--models", nargs="+", default=["diffusion", "baseline"], choices=["diffusion", "baseline"],
                    help="models of the quality and framing table")
    ap.add_argument("--window-growth", nargs="*", type=float, default=[],
                    help="also run both models with windows grown up to these max_window_fraction values")
    ap.add_argument("--train-dirs", nargs="*", default=[], help="TensorBoard folders of the two training runs")
    ap.add_argument("--epoch-length", type=int, default=200, help="iterations per epoch of those runs (demo.json)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BUNDLE))
    from common.data.demo import build_ct_framings, build_ct_demo
    from common.data.fetch import cache_dir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    framings = Path(build_ct_framings(cache_dir() / "diffseg-demo-eval"))
    results: dict = {
        "command": "python benchmarks/diffseg_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "load_average_at_start": os.getloadavg(),
        "configs": "inference.json + evaluate.json (+ train_baseline.json) + demo.json, no other override",
    }
    for model, ckpt in (("diffusion", args.diffusion_ckpt), ("baseline", args.baseline_ckpt)):
        if model in args.models:
            cases = evaluate(model, framings, out / model, ckpt)
            if "precision_used" in cases:  # OpenVINO's arithmetic, beside the cases, not among them
                results[model + "_precision_used"] = cases.pop("precision_used")
            results[model] = cases
            results[model + "_native_grid"] = native_grid_dice(framings, out / model)
    if "diffusion" in results and "baseline" in results:
        results["difference_diffusion_minus_baseline"] = {
            case: round(results["diffusion"][case]["mean_dice"] - results["baseline"][case]["mean_dice"], 4)
            for case in results["diffusion"]
        }
    for model in (m for m in ("diffusion", "baseline") if args.runtimes and m in args.models):
        # results["runtimes"] (the diffusion model, as before) and results["runtimes_baseline"]
        key = "runtimes" if model == "diffusion" else "runtimes_baseline"
        ckpt = args.diffusion_ckpt if model == "diffusion" else args.baseline_ckpt
        results[key], used = compare(model, framings, out / key, ckpt, RUNTIMES, "torch", "dice_minus_torch")
        results[key.replace("runtimes", "runtime_precision_used")] = used  # f32 where the CPU has no bf16 units
    if args.window_growth:
        fractions = [(f"{f:g}", {"max_window_fraction": f}) for f in [1.0, *args.window_growth]]
        results["window_growth"] = {
            model: compare(model, framings, out / "window_growth" / model,
                           args.diffusion_ckpt if model == "diffusion" else args.baseline_ckpt, fractions, "1",
                           "dice_minus_default")[0]
            for model in ("diffusion", "baseline")
        }
    if args.samplers:
        test = Path(build_ct_demo(cache_dir() / "diffseg-demo-eval", n_train=1, n_val=0, seed=0))
        sampling = {}
        runs = [("DDPM 5 steps", {}), ("DDIM 5 steps (eta 0)", {"sampler": "ddim"})]
        if args.chain_steps:
            runs.append((f"DDPM {args.chain_steps} steps (resampled schedule)", {"infer_timesteps": args.chain_steps}))
        for name, over in runs:
            res = evaluate("diffusion", test, out / "samplers" / name.split(" (")[0].replace(" ", "_"), args.diffusion_ckpt, **over)
            case = res["example"]
            sampling[name] = {"mean_dice": case["mean_dice"], "seconds": case.get("seconds")}
        base = sampling["DDPM 5 steps"]
        for v in sampling.values():
            v["dice_minus_5_step"] = round(v["mean_dice"] - base["mean_dice"], 4)
            v["time_ratio_to_5_step"] = round(v["seconds"] / base["seconds"], 1) if v.get("seconds") and base.get("seconds") else None
        results["sampling"] = sampling
    if args.train_dirs:
        results["learning_curves"] = learning_curves(args.train_dirs, out / "learning_curves.png", args.epoch_length)
    results["load_average_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(json.dumps({k: v for k, v in results.items() if k != "learning_curves"}, indent=2))
    return results


if __name__ == "__main__":
    main()
