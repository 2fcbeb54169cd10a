#!/usr/bin/env python
"""Diffusion (ImgX-DiffSeg) versus the non-diffusion baseline on the demo CT cohort, and sampler cost.

Both models are trained through the bundle's own configs (``train.json`` and the
``train_baseline.json`` overlay) with the same data, augmentation, seed, network width and number
of iterations, on the deformation cohort of the TotalSegmentator example CT; the checkpoint with
the best validation Dice (without background) is evaluated with ``evaluate.json`` on the held-out
original scan (Dice without background and HD95 per class). Then the trained diffusion network
times the 5-step sampler against a 1000-step DDPM chain (schedule resampled to 1000 of the 1001
linear steps) on the same preprocessed test volume.

Usage (from the repository root)::

    python benchmarks/diffseg.py --out runs/bench_diffseg --iters 300

Prints one JSON document (also written to ``<out>/results.json``). The demo labels are
TotalSegmentator outputs merged to 6 organ groups, and the cohort is one patient deformed: the
numbers measure the pipeline, not clinical accuracy.
"""

from __future__ import annotations

import argparse
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


def _workflow(files, workflow_type, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    return wf


def _summary(path: Path) -> dict:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    per_class = {r["name"]: {"dice": float(r["dice_mean"]), "hd95": float(r["hd95_mean"])} for r in rows if r["class"] != "overall"}
    overall = next(r for r in rows if r["class"] == "overall")
    return {
        "dice_nobg": float(overall["dice_mean"]),
        "hd95_mm": float(overall["hd95_mean"]),
        "nsd_1mm": float(overall["nsd_mean"]),
        "cd_mm": float(overall["cd_mean"]),
        "per_class": per_class,
    }


def train_and_evaluate(name: str, overlays: list[str], datalist: Path, out: Path, common: dict) -> dict:
    ckpt_dir, run_dir = out / name / "models", out / name / "outputs"
    wf = _workflow(["train.json", *overlays], "train", dataset_dir=str(datalist.parent), datalist=str(datalist),
                   ckpt_dir=str(ckpt_dir), output_dir=str(run_dir), overwrite=True, **common)
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    t0 = time.perf_counter()
    wf.run()
    train_s = time.perf_counter() - t0
    best = float(wf.parser.get_parsed_content("validate#evaluator").state.best_metric)
    wf.finalize()
    infer_common = {k: v for k, v in common.items() if k in ("channels", "pixdim", "num_classes", "infer_roi_size", "amp")}
    ev = _workflow(["inference.json", "evaluate.json", *[o for o in overlays if "baseline" in o]], "infer",
                   dataset_dir=str(datalist.parent), datalist_file=str(datalist), ckpt_dir=str(ckpt_dir),
                   output_dir=str(out / name / "eval"), overwrite=True, **infer_common)
    t0 = time.perf_counter()
    ev.run()
    eval_s = time.perf_counter() - t0
    ev.finalize()
    res = _summary(out / name / "eval" / "metrics_summary.csv")
    n = len(losses)
    res.update(
        iterations=n, train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1), best_val_dice_nobg=best,
        loss_first10=sum(losses[:10]) / max(min(n, 10), 1), loss_last10=sum(losses[-10:]) / max(min(n, 10), 1),
    )
    return res


def time_samplers(datalist: Path, out: Path, common: dict, steps: list[int], crop: int | None = None) -> dict:
    """Seconds per sampling of the test volume for each number of steps, with the trained diffusion network."""
    from common.inferers import DiffSegInferer
    from common.schedulers import DiffSegScheduler

    wf = _workflow(["inference.json", "evaluate.json"], "infer", dataset_dir=str(datalist.parent), datalist_file=str(datalist),
                   ckpt_dir=str(out / "diffusion" / "models"), output_dir=str(out / "timing"), overwrite=True,
                   **{k: v for k, v in common.items() if k in ("channels", "pixdim", "num_classes", "amp")})
    net = wf.parser.get_parsed_content("network")

    sd = torch.load(out / "diffusion" / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(sd)
    net.eval()
    item = wf.parser.get_parsed_content("dataset")[0]
    image = item["image"].unsqueeze(0).to(wf.parser.get_parsed_content("device"))
    label = item["label"]
    if crop:
        # a centred crop keeps a 1000-step chain affordable on a CPU; every T sees the same input
        lo = [max((s - crop) // 2, 0) for s in image.shape[2:]]
        window = tuple(slice(a, a + crop) for a in lo)
        image, label = image[(..., *window)], label[(..., *window)]
    result = {"volume_shape": list(image.shape[2:])}
    for T in steps:
        sched = DiffSegScheduler(num_timesteps=T, num_timesteps_beta=1001)
        inf = DiffSegInferer(int(common["num_classes"]), scheduler=sched, roi_size=None, seed=0)
        with torch.no_grad():
            inf(image[..., :16, :16, :16], net)  # warm-up
            if image.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = inf(image, net)
            if image.is_cuda:
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        pred = logits.argmax(1)[0].cpu()
        from common.metrics.segmentation import dice

        ds = [dice(pred == c, label[0] == c) for c in range(1, int(common["num_classes"]))]
        ds = [d for d in ds if d == d]
        result[f"{T}_steps"] = {"seconds": round(dt, 2), "network_passes": T, "dice_nobg": sum(ds) / max(len(ds), 1)}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_diffseg")
    ap.add_argument("--iters", type=int, default=300, help="training iterations of each model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up 20 iterations, cosine to lr/100)")
    ap.add_argument("--channels", type=int, nargs=4, default=[4, 8, 8, 16])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="training patch (inference: whole volume)")
    ap.add_argument("--pixdim", type=float, default=6.0, help="isotropic spacing (mm) of the preprocessed volumes")
    ap.add_argument("--val-every", type=int, default=50, help="validation interval in iterations")
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--n-val", type=int, default=2)
    ap.add_argument("--sampler-steps", type=int, nargs="+", default=[5, 1000])
    ap.add_argument("--sampler-crop", type=int, default=None, help="time the samplers on a centred crop of this size")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    os.environ.setdefault("PYTHONPATH", str(REPO))
    from common.data.demo import CT_LABELS, build_ct_demo
    from common.data.fetch import cache_dir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = Path(build_ct_demo(cache_dir() / "bench-demo", n_train=args.n_train, n_val=args.n_val, seed=0))
    epoch_len = args.val_every
    common = {
        "num_classes": len(CT_LABELS),
        "pixdim": [args.pixdim] * 3,
        "volume_size": [64, 64, 64],
        "patch_size": list(args.patch),
        "infer_roi_size": None,
        "translate_range": [3, 3, 3],
        "channels": list(args.channels),
        "batch_size": args.batch,
        "num_workers": 0,
        "cache_rate": 1.0,
        "epoch_length": epoch_len,
        "max_epochs": max(args.iters // epoch_len, 1),
        "val_interval": 1,
        "ckpt_interval": 1000,
        "lr_warmup_steps": 20,
        "lr_decay_steps": args.iters,
        "learning_rate": args.lr,
        "lr_init": args.lr / 10,
        "lr_end": args.lr / 100,
        "amp": torch.cuda.is_available(),
    }
    results = {
        "command": "python benchmarks/diffseg.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": {k: v for k, v in common.items() if k not in ("amp",)},
        "data": {"train": args.n_train, "val": args.n_val, "test": "original TotalSegmentator example CT", "classes": CT_LABELS},
    }
    results["diffusion"] = train_and_evaluate("diffusion", [], datalist, out, common)
    results["baseline"] = train_and_evaluate("baseline", ["train_baseline.json"], datalist, out, common)
    results["sampling"] = time_samplers(datalist, out, common, args.sampler_steps, args.sampler_crop)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
