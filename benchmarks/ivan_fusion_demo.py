#!/usr/bin/env python
"""The shipped ivan_fusion demo models on the real avg152 test case and its reframings, against baselines.

Everything about iVAN runs through the bundle's own configs with only the demo overlay and the task overlay
(``inference.json`` + ``evaluate.json`` + ``demo.json`` + ``task_<task>.json``), as a user runs them:

1. **Synthesis** (``1to1``: T1 -> T2, ``2to1``: T1 + PD -> T2): the shipped iVAN on the real SPM avg152 triple
   (91 axial slices, never seen in training), on that triple in a 1.5x field of view padded with background,
   and on a 40 mm slab (20 axial slices); 3D PSNR / SSIM / NMSE and the per-slice means from
   ``evaluate.json``'s ``summary.csv``, and the reverse reconstruction of the sources from the forward output.
   Baselines on the same images, computed here with the same metric code (``scripts.evaluate.synthesis_rows``):
   a 2D UNet regression trained on the same simulated slices for the same wall-clock budget as the iVAN
   (``--budget-s``, one CPU thread, as the iVAN), and the T1 histogram-matched to the training T2 intensities.
   The invertibility of the shipped network: ``max |f^-1(f(x)) - x|`` in float32 on every real test slice.
2. **Fusion** (T2 + CT-like): the shipped iVAN against its reference rule (Laplacian max-abs, PSNR) with
   AG/SF/EN/QMI/Q^AB/F/Piella's Q of iVAN, the reference and averaging, from ``evaluate.json``.
3. **Learning curves** (``--train-dirs``): training loss terms and validation PSNR of the iVAN runs from
   their TensorBoard files, and the UNets' training loss, as one PNG.

Usage (from the repository root; ``DATA`` is ``python -m common.data.demo --what brain_mri --n-train 16
--n-val 2 --seed 0 --out DATA``)::

    python benchmarks/ivan_fusion_demo.py --datalist DATA/brain_mri/datalist.json --out runs/ivan_demo_eval \\
        --budget-s 2700 --train-dirs runs/ivan_demo/1to1/outputs runs/ivan_demo/2to1/outputs runs/ivan_demo/fusion/outputs

or one task per CPU core (``--tasks 1to1 --out A``, ``--tasks 2to1,fusion --out B``), then
``--merge A/results.json B/results.json --out C --train-dirs ...`` for one report. Writes ``results.json``, ``results.md`` (the card's tables) and ``learning_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ivan_fusion"
TASKS = {"1to1": ["t1"], "2to1": ["t1", "pd"], "fusion": ["t2", "ct"]}
for _p in (str(REPO), str(BUNDLE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common.data.demo import BRAIN_FRAMINGS, build_brain_framings  # noqa: E402


def evaluate_ivan(task: str, datalist: Path, out: Path) -> dict:
    """``evaluate.json`` + the demo and task overlays on every ``test`` case; per-case metrics and seconds."""
    from monai.bundle import ConfigWorkflow

    files = ["inference.json", "evaluate.json", "demo.json", f"task_{task}.json"]
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        datalist=str(datalist),
        output_dir=str(out),
        overwrite=True,
    )
    wf.initialize()
    t0 = time.perf_counter()
    wf.run()
    seconds = time.perf_counter() - t0
    wf.finalize()
    with open(out / "metrics_per_case.csv") as fh:
        cases = {r["case"]: {k: float(v) for k, v in r.items() if k != "case" and v not in ("", None)} for r in csv.DictReader(fh)}
    with open(out / "summary.csv") as fh:
        slice_means = {r["metric"]: float(r["mean"]) for r in csv.DictReader(fh) if r["level"] == "per_slice"}
    return {"cases": cases, "slice_means": slice_means, "seconds_all_cases": round(seconds, 1)}


def inverse_error(task: str, datalist: Path) -> float:
    """``max |f^-1(f(x)) - x|`` of the shipped network, float32, on every slice of the real test case."""
    from monai.bundle import ConfigParser

    from benchmarks.ivan_fusion import _load_volumes
    from common.transforms.ivan import augment_sources

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("inference.json", "demo.json", f"task_{task}.json")])
    parser["bundle_root"] = str(BUNDLE)
    net = parser.get_parsed_content("network_def")
    state = torch.load(parser.get_parsed_content("ckpt_path"), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))
    net.eval()
    case = json.loads(datalist.read_text())["test"][0]
    vol = _load_volumes([{k: str(datalist.parent / case[k]) for k in TASKS[task]}], TASKS[task])[0]
    x = torch.cat([torch.as_tensor(vol[k]) for k in TASKS[task]]).float()
    xa = augment_sources(x, net.channels)
    xa = xa.permute(3, 0, 1, 2)  # (slices, C, H, W)
    with torch.no_grad():
        return float(max((net.inverse(net(xa[i : i + 8])) - xa[i : i + 8]).abs().max() for i in range(0, len(xa), 8)))


def unet_baseline(task: str, datalist: Path, budget_s: float, seed: int, unet_dir: Path) -> tuple[dict, dict]:
    """Train the 2D UNet regression for ``budget_s`` seconds (or reuse ``unet_dir/unet_<task>.pt`` and its
    training record from an earlier run); metrics on every test framing, and the training loss curve. Same UNet
    as ``benchmarks/ivan_fusion.py``."""
    from monai.networks.nets import UNet

    from benchmarks.ivan_fusion import _load_volumes, _slices, _train, _volume_infer, _Fn
    from scripts.evaluate import synthesis_rows

    inputs = TASKS[task]
    dl = json.loads(datalist.read_text())
    vols_tr = _load_volumes([{k: str(datalist.parent / e[k]) for k in inputs + ["t2"]} for e in dl["training"]], inputs + ["t2"])
    X, Y = _slices(vols_tr, inputs, lambda v: torch.as_tensor(v["t2"]))
    torch.manual_seed(seed)
    unet = UNet(2, len(inputs), 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    curve: list[float] = []

    def fn(x):
        h, w = x.shape[-2:]
        p = (0, (-w) % 8, 0, (-h) % 8)
        return torch.clamp(unet(F.pad(x, p))[..., :h, :w], 0, 1)

    def step(idx):
        opt.zero_grad()
        loss = F.mse_loss(fn(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        curve.append(loss.item())
        return curve[-1]

    weights, record = unet_dir / f"unet_{task}.pt", unet_dir / f"unet_{task}.json"
    if weights.is_file() and record.is_file():
        unet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        train = json.loads(record.read_text())
    else:
        train = _train(step, X.shape[0], budget_s, 4, seed)
        block = 50
        train["loss_curve"] = [(i + block, float(np.mean(curve[i : i + block]))) for i in range(0, len(curve) - block + 1, block)]
        unet_dir.mkdir(parents=True, exist_ok=True)
        torch.save(unet.state_dict(), weights)
        record.write_text(json.dumps(train))
    unet.eval()
    metrics = {}
    for case in dl["test"]:
        keys = inputs + ["t2", "mask"]
        vol = _load_volumes([{k: str(datalist.parent / case[k]) for k in keys}], keys)[0]
        x = torch.cat([torch.as_tensor(vol[k]) for k in inputs]).float()
        pred = _volume_infer(_Fn(fn), x).numpy()[0]
        _, row = synthesis_rows(pred, np.asarray(vol["t2"])[0], "t2", np.asarray(vol["mask"])[0])
        metrics[case["id"]] = row
    return train, metrics


def histogram_baseline(datalist: Path) -> dict:
    """The T1 histogram-matched (inside the head) to the intensities of the training T2 images."""
    from skimage.exposure import match_histograms

    from benchmarks.ivan_fusion import _load_volumes
    from scripts.evaluate import synthesis_rows

    dl = json.loads(datalist.read_text())
    train = _load_volumes([{"t2": str(datalist.parent / e["t2"])} for e in dl["training"]], ["t2"])
    ref = np.concatenate([np.asarray(v["t2"]).ravel() for v in train])
    ref = ref[ref > 0]
    out = {}
    for case in dl["test"]:
        vol = _load_volumes([{k: str(datalist.parent / case[k]) for k in ("t1", "t2", "mask")}], ["t1", "t2", "mask"])[0]
        t1 = np.asarray(vol["t1"])[0]
        hist = np.zeros_like(t1)
        hist[t1 > 0] = match_histograms(t1[t1 > 0], ref)
        _, row = synthesis_rows(hist, np.asarray(vol["t2"])[0], "t2", np.asarray(vol["mask"])[0])
        out[case["id"]] = row
    return out


def learning_curves(train_dirs: list[str], unets: dict, png: Path) -> dict:
    """Loss terms (mean of each 25 iterations) and validation PSNR of the iVAN runs, and the UNets' loss, against
    minutes of training (the budget both share; the UNet makes about 150x more iterations in it)."""
    import matplotlib
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.2))
    for folder in train_dirs:
        name = next((t for t in TASKS if t in folder), Path(folder).name)
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        entry = {}
        t0 = None
        for tag in ("loss", "loss_fwd", "loss_rev"):
            full = next((t for t in tags if t.endswith(tag) and not t.endswith("_" + tag)), None)
            if full is None:
                continue
            events = acc.Scalars(full)
            t0 = events[0].wall_time if t0 is None else t0
            vals = [((e.wall_time - t0) / 60.0, e.value) for e in events]
            block = 25
            entry[tag] = [(vals[i + block - 1][0], float(np.mean([v for _, v in vals[i : i + block]])))
                          for i in range(0, len(vals) - block + 1, block)]
        val_tag = next((t for t in tags if "psnr" in t.lower()), None)
        if val_tag:
            entry["val_psnr"] = [((e.wall_time - (t0 or e.wall_time)) / 60.0, e.value) for e in acc.Scalars(val_tag)]
            ax_val.plot(*zip(*entry["val_psnr"]), marker="o", label=f"iVAN {name}")
        if "loss" in entry:
            line, = ax_loss.plot(*zip(*entry["loss"]), label=f"iVAN {name} (fwd + rev)")
            if "loss_fwd" in entry:
                ax_loss.plot(*zip(*entry["loss_fwd"]), ls=":", color=line.get_color(), label=f"iVAN {name} (fwd term)")
        curves[name] = entry
    for task, train in unets.items():
        if train.get("loss_curve"):
            per_min = train["iterations"] / (train["seconds"] / 60.0)
            ax_loss.plot([i / per_min for i, _ in train["loss_curve"]], [v for _, v in train["loss_curve"]], ls="--",
                         label=f"UNet {task} (MSE)")
    ax_loss.set(xlabel="minutes of training (wall clock)", ylabel="training loss", yscale="log",
                title="training loss (simulated slices)")
    ax_val.set(xlabel="minutes of training (wall clock)", ylabel="PSNR (dB)",
               title="iVAN validation PSNR (2 held-out simulated subjects)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return curves


def markdown(results: dict) -> str:
    lines = [f"Budget {results['budget_s']:.0f} s per synthesis model, 1 CPU thread each; {results['machine']}; "
             f"{results['date']}.", ""]
    for task in ("1to1", "2to1"):
        if task not in results["tasks"]:
            continue
        r = results["tasks"][task]
        lines += [f"#### {task} ({' + '.join(TASKS[task])} -> t2)", "",
                  "| test image | method | PSNR 3D | SSIM 3D | NMSE 3D | PSNR 3D brain | r brain |",
                  "|---|---|---|---|---|---|---|"]
        for case, title in BRAIN_FRAMINGS.items():
            for name, m in (("iVAN (demo model)", r["ivan"]["cases"].get(case, {})), ("2D UNet", r["unet"].get(case, {})),
                            ("T1 histogram-matched", results["histogram"].get(case, {}))):
                if not m:
                    continue
                lines.append(f"| {title} | {name} | {m['t2_psnr3d']:.2f} | {m['t2_ssim3d']:.4f} | {m['t2_nmse3d']:.4f} | "
                             f"{m.get('t2_psnr3d_mask', float('nan')):.2f} | {m.get('t2_r_mask', float('nan')):.3f} |")
        orig = r["ivan"]["cases"].get("avg152", {})
        revs = [k for k in orig if k.startswith("rev_") and k.endswith("_psnr3d")]
        rev = ", ".join(f"{k[4:-7]} {orig[k]:.1f} dB" for k in revs)
        lines += ["", f"Sources rebuilt by the inverse from the forward output (avg152, 3D PSNR): {rev}. "
                  f"max |f^-1(f(x)) - x| on all 91 real slices, float32: {r['inverse_max_abs_err']:.2e}.",
                  f"UNet: {r['unet_train']['iterations']} iterations in {r['unet_train']['seconds']:.0f} s.", ""]
    if "fusion" in results["tasks"]:
        r = results["tasks"]["fusion"]
        lines += ["#### fusion (real avg152 T2 + CT-like image of the same space)", "",
                  "| test image | iVAN vs reference rule PSNR 3D | method | AG | SF | EN | QMI | Q^AB/F | Piella Q |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case, title in BRAIN_FRAMINGS.items():
            m = r["ivan"]["cases"].get(case)
            if not m:
                continue
            for name in ("ivan", "reference", "average"):
                s = r["ivan"]["slice_means_by_case"][case]
                lines.append(f"| {title} | {m['fused_psnr3d']:.2f} | {name} | " + " | ".join(
                    f"{s.get(f'{name}_{k}', float('nan')):.3f}" for k in ("ag", "sf", "en", "qmi", "qabf", "piella_q")) + " |")
        lines += ["", f"max |f^-1(f(x)) - x| on all real slices, float32: {r['inverse_max_abs_err']:.2e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--datalist", required=True, help="brain_mri/datalist.json of common.data.demo (with 'ct')")
    p.add_argument("--out", default="runs/ivan_demo_eval")
    p.add_argument("--budget-s", type=float, default=2700.0, help="UNet training seconds (= the iVAN's training time)")
    p.add_argument("--tasks", default="1to1,2to1,fusion")
    p.add_argument("--skip-unet", action="store_true", help="only the shipped iVAN models and histogram matching")
    p.add_argument("--unet-dir", default=None, help="where the UNets are saved and reused from (default: --out)")
    p.add_argument("--train-dirs", nargs="*", default=[])
    p.add_argument("--merge", nargs="*", default=[], help="results.json files of earlier runs (e.g. one task per CPU "
                   "core) to combine into one report, without running anything but the learning curves")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = {**parts[0], "tasks": {}, "histogram": None, "command": [r["command"] for r in parts]}
        for r in parts:
            results["tasks"].update(r["tasks"])
            results["histogram"] = results.get("histogram") or r.get("histogram")
        unets = {t: r["unet_train"] for t, r in results["tasks"].items() if "unet_train" in r}
        if args.train_dirs:
            results["curves"] = learning_curves(args.train_dirs, unets, out / "learning_curves.png")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        (out / "results.md").write_text(markdown(results))
        return results
    datalist = build_brain_framings(Path(args.datalist).resolve(), out)
    results = {"budget_s": args.budget_s, "date": time.strftime("%Y-%m-%d"), "tasks": {},
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, no GPU",
               "command": "python " + " ".join(sys.argv)}
    tasks = [t for t in args.tasks.split(",") if t]
    results["histogram"] = histogram_baseline(datalist) if any(t != "fusion" for t in tasks) else None
    unets = {}
    for task in tasks:
        r = {"ivan": evaluate_ivan(task, datalist, out / task / "ivan"), "inverse_max_abs_err": inverse_error(task, datalist)}
        if task == "fusion":
            by_case = {}
            with open(out / task / "ivan" / "metrics_per_slice.csv") as fh:
                for row in csv.DictReader(fh):
                    c = by_case.setdefault(row["case"], {})
                    for k, v in row.items():
                        if k not in ("case", "slice") and v not in ("", None):
                            c.setdefault(k, []).append(float(v))
            r["ivan"]["slice_means_by_case"] = {c: {k: float(np.mean(v)) for k, v in m.items()} for c, m in by_case.items()}
        elif not args.skip_unet:
            r["unet_train"], r["unet"] = unet_baseline(task, datalist, args.budget_s, args.seed, Path(args.unet_dir or out))
            unets[task] = r["unet_train"]
        else:
            r["unet_train"], r["unet"] = {"iterations": 0, "seconds": 0.0}, {}
        results["tasks"][task] = r
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        print(f"[{task}] done: {json.dumps(r['ivan']['cases'], default=float)[:600]}", flush=True)
    if args.train_dirs:
        results["curves"] = learning_curves(args.train_dirs, unets, out / "learning_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    print(json.dumps({t: {k: v for k, v in r.items() if k in ("inverse_max_abs_err",)} for t, r in results["tasks"].items()}))
    return results


if __name__ == "__main__":
    main()
