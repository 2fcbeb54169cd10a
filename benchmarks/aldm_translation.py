#!/usr/bin/env python
"""Benchmark of the aldm_translation bundle on the demo cohort, with two baselines measured in the same run.

1. Build the demo cohort (simulated T1/T2/PD/FLAIR subjects for training, the real SPM avg152
   T1/T2/PD triple for testing; ``common.data.demo``).
2. Train the three ALDM stages with the bundle's configs (tiny overlay by default) for a fixed
   number of iterations each, through ``monai.bundle.ConfigWorkflow``.
3. Baselines, on the same preprocessed test grid:
   - ``histmatch``: the source image histogram-matched to the target (``skimage.exposure``),
     inside the brain mask; it sees the target's intensity distribution, so it is an optimistic
     intensity-only baseline;
   - ``unet``: a plain 3D UNet regression ``[x_src, one-hot(target) maps] -> x_tgt`` (L1, Adam)
     trained on the same data and transforms for the same wall-clock time as the three ALDM
     stages together.
4. Evaluate ALDM with the bundle's ``evaluate.json`` (every direction of the test triple) in
   ``spade_only`` mode and with DDIM at 200 / 100 / 50 / 25 steps (eta 1): PSNR / NMSE / SSIM per
   direction, time per translated volume and peak memory (CUDA allocator peak, or the process
   resident-set peak on CPU).

Writes ``results.json`` and ``results.md`` to ``--out``. Example (CPU, a few minutes)::

    python benchmarks/aldm_translation.py --out /tmp/aldm_bench --iters 200 100 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "aldm_translation"
CONFIGS = BUNDLE / "configs"
METRICS = ("psnr", "nmse", "ssim", "psnr_mask", "nmse_mask", "ssim_mask")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the resident-set high-water mark of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _workflow(config: str, workflow_type: str, overlays: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / config)] + [str(CONFIGS / o) for o in overlays],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


#: voxel size of the simulated demo cohort and of avg152 (common.data.demo)
DEMO_PIXDIM = [2.0, 2.0, 2.0]


def _parser(config: str, overlays: list[str], **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / config)] + [str(CONFIGS / o) for o in overlays])
    parser["bundle_root"] = str(BUNDLE)
    parser["pixdim"] = DEMO_PIXDIM  # the demo cohort's spacing, whatever the overlay's default (light: 1 mm)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict:
    from common.metrics.image import nmse, psnr, ssim3d

    pred = np.clip(pred, 0.0, 1.0)
    return {
        "psnr": psnr(pred, target), "nmse": nmse(pred, target), "ssim": ssim3d(pred, target),
        "psnr_mask": psnr(pred, target, mask=mask), "nmse_mask": nmse(pred, target, mask=mask),
        "ssim_mask": ssim3d(pred, target, mask=mask),
    }


def _test_items(overlays, dataset_dir, **overrides):
    """Preprocessed test directions (source, target, mask on the model grid) of evaluate.json (``overrides``:
    config keys, e.g. ``test_split="validation"``)."""
    parser = _parser("evaluate.json", overlays, dataset_dir=dataset_dir, **overrides)
    ds = parser.get_parsed_content("dataset")
    out = []
    for i in range(len(ds)):
        d = ds[i]
        src, tgt = d["image"][0].numpy(), d["target"][0].numpy()
        mask = d["mask"][0].numpy() > 0 if "mask" in d else (src > 0) | (tgt > 0)
        out.append({"id": d.get("id"), "source": d["source"], "target": d["targets"][0], "x": src, "y": tgt, "mask": mask})
    return out


def histmatch_baseline(items) -> dict:
    from common.transforms.intensity import histogram_matched

    return {f"{it['source']}2{it['target']}": _scores(histogram_matched(it["x"], it["y"], it["mask"]), it["y"], it["mask"])
            for it in items}


#: BasicUNet widths of the UNet regression baseline (1.44 M parameters with 3 modalities)
UNET_FEATURES = (16, 16, 32, 64, 128, 16)


def unet_net(num_modalities: int, features=UNET_FEATURES):
    """The UNet regression baseline: ``[x_src, one-hot(target) maps] -> x_tgt`` (MONAI ``BasicUNet``)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1 + num_modalities, out_channels=1, features=tuple(features))


def unet_inputs(x: torch.Tensor, target: str, modalities) -> torch.Tensor:
    """``x`` (N, 1, *S) with one constant map per modality, 1 for ``target``: (N, 1 + M, *S)."""
    modalities = list(modalities)
    onehot = torch.zeros(x.shape[0], len(modalities), *x.shape[2:], device=x.device, dtype=x.dtype)
    onehot[:, modalities.index(target)] = 1.0
    return torch.cat([x, onehot], dim=1)


def unet_train_step(net, opt, batch: dict, modalities, device) -> float:
    """One L1 step on a random ordered pair (source != target) of the batch's modalities; returns the loss."""
    from common.engines.aldm_steps import sample_pair

    net.train()
    s, t = sample_pair(list(modalities), allow_identity=False)
    x, y = torch.as_tensor(batch[s]).to(device), torch.as_tensor(batch[t]).to(device)
    loss = torch.nn.functional.l1_loss(net(unet_inputs(x, t, modalities)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def unet_predict(net, x: np.ndarray, target: str, modalities, device="cpu") -> np.ndarray:
    """The UNet's translation of one preprocessed source volume ``x`` (H, W, D) into ``target``."""
    net.eval()
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)[None, None].to(device)
    return net(unet_inputs(xt, target, modalities))[0, 0].cpu().numpy()


def unet_baseline(overlays, dataset_dir, modalities, seconds, items, device, seed=0) -> tuple[dict, dict]:
    """Train a plain 3D UNet regression for ``seconds`` and score it on ``items``."""
    torch.manual_seed(seed)
    parser = _parser("train_spade.json", overlays, dataset_dir=dataset_dir)
    loader = parser.get_parsed_content("train#dataloader")
    net = unet_net(len(modalities)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    start, iters = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for batch in loader:
            unet_train_step(net, opt, batch, modalities, device)
            iters += 1
            if time.perf_counter() - start >= seconds:
                break
    rows = {}
    for it in items:
        pred = unet_predict(net, it["x"], it["target"], modalities, device)
        rows[f"{it['source']}2{it['target']}"] = _scores(pred, it["y"], it["mask"])
    return rows, {"iterations": iters, "seconds": round(time.perf_counter() - start, 1),
                  "parameters": sum(p.numel() for p in net.parameters())}


def _mean(rows: dict) -> dict:
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in METRICS}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (demo data, checkpoints, results)")
    ap.add_argument("--overlay", default="tiny.json", help="bundle overlay: tiny.json (CPU) or light.json (GPU)")
    ap.add_argument("--iters", type=int, nargs=3, default=[200, 100, 200], metavar=("AE", "SPADE", "LDM"),
                    help="training iterations of stages 1, 2, 3 (rounded up to whole epochs)")
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 100, 50, 25], help="DDIM step counts")
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="model grid (default: the overlay's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from common.data.demo import build_brain_mri_demo
    from common.engines import get_device

    sys.path.insert(0, str(BUNDLE))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = Path(build_brain_mri_demo(out / "demo", n_train=args.n_train, n_val=1, seed=args.seed))
    dataset_dir = str(datalist.parent)
    overlays = [args.overlay]
    ckpt, runs = out / "models", out / "runs"
    base = {"dataset_dir": dataset_dir, "ckpt_dir": str(ckpt), "output_dir": str(runs), "seed": args.seed,
            "pixdim": DEMO_PIXDIM}
    if args.roi:
        base.update(roi_size=list(args.roi), train_roi_size=list(args.roi), ae_train_roi_size=list(args.roi))
    modalities = _parser("train_spade.json", overlays).get_parsed_content("modalities")
    device = get_device()

    results: dict = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), "device": str(device),
                     "torch_threads": torch.get_num_threads(), "overlay": args.overlay, "train": {}}
    train_seconds = 0.0
    for config, iters in zip(("train_autoencoder.json", "train_spade.json", "train_diffusion.json"), args.iters):
        epochs = max(1, -(-iters // args.n_train))
        _reset_peak()
        t0 = time.perf_counter()
        # overwrite: a benchmark re-run retrains from scratch into the same folder
        _workflow(config, "train", overlays, **base, max_epochs=epochs, epoch_length=None, val_interval=epochs, overwrite=True)
        dt = time.perf_counter() - t0
        train_seconds += dt
        results["train"][config] = {"iterations": epochs * args.n_train, "seconds": round(dt, 1), "peak_mib": round(_peak_mib())}

    items = _test_items(overlays, dataset_dir)
    results["baselines"] = {"histmatch": histmatch_baseline(items)}
    unet_rows, unet_info = unet_baseline(overlays, dataset_dir, modalities, train_seconds, items, device, args.seed)
    results["baselines"]["unet"] = unet_rows
    results["unet_training"] = unet_info

    results["aldm"] = {}
    runs_to_do = [("spade_only", None)] + [("diffusion", s) for s in args.steps]
    for mode, steps in runs_to_do:
        name = mode if steps is None else f"ddim{steps}"
        overrides = {**base, "output_dir": str(out / "eval" / name), "mode": mode, "overwrite": True, "montage": False}
        if steps is not None:
            overrides["num_inference_steps"] = steps
        _reset_peak()
        t0 = time.perf_counter()
        _workflow("evaluate.json", "infer", overlays, **overrides)
        dt = time.perf_counter() - t0
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        per_dir = {k: {m: v[m]["mean"] for m in METRICS} for k, v in summary.items() if k != "all"}
        results["aldm"][name] = {"per_direction": per_dir, "mean": {m: summary["all"][m]["mean"] for m in METRICS},
                                 "seconds_per_volume": round(dt / len(per_dir), 2), "peak_mib": round(_peak_mib())}

    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return results


def _markdown(r: dict) -> str:
    lines = [f"device: {r['device']} ({r['torch_threads']} threads), overlay {r['overlay']}", "",
             "| stage | iterations | time (s) | peak memory (MiB) |", "|---|---|---|---|"]
    for k, v in r["train"].items():
        lines.append(f"| {k} | {v['iterations']} | {v['seconds']} | {v['peak_mib']} |")
    u = r["unet_training"]
    lines += ["", f"UNet baseline: {u['parameters']} parameters, {u['iterations']} iterations in {u['seconds']} s", ""]
    lines += ["| method | direction | PSNR | NMSE | SSIM | PSNR mask | NMSE mask | SSIM mask |", "|---|---|---|---|---|---|---|---|"]
    rows = [(f"baseline {k}", v) for k, v in r["baselines"].items()] + [(f"ALDM {k}", v["per_direction"]) for k, v in r["aldm"].items()]
    for name, per_dir in rows:
        for d, s in list(per_dir.items()) + [("mean", _mean(per_dir))]:
            lines.append(f"| {name} | {d} | " + " | ".join(f"{s[m]:.4g}" for m in METRICS) + " |")
    lines += ["", "| sampler | s / volume | peak memory (MiB) | mean PSNR | mean SSIM |", "|---|---|---|---|---|"]
    for k, v in r["aldm"].items():
        lines.append(f"| {k} | {v['seconds_per_volume']} | {v['peak_mib']} | {v['mean']['psnr']:.3f} | {v['mean']['ssim']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
