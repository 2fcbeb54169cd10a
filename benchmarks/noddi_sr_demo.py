#!/usr/bin/env python
"""The noddi_sr demo model: train its three stages and the B2 baseline at one wall-clock budget, then evaluate.

Three sub-commands, each writing into ``--out``:

- ``train``: the bundle's three training configs with the demo overlay (``train_<stage>.json`` + ``demo.json``)
  on a phantom cohort, one stage after the other, each stopped at the end of the first 100-iteration epoch after
  its share of the budget (``--budget-s`` split by ``--shares``); every epoch validates and the best validation
  PSNR is kept (as the stage configs do). Learning curves (training loss every 10 iterations, validation PSNR per
  epoch) go to ``<out>/curves_<stage>.json``, weights to ``<out>/models``.
- ``baseline``: B2, a direct regression UNet (MONAI ``BasicUNet(3, C_feat, 3)``, GroupNorm 8, sigmoid, L1 to the HR
  maps) on the trilinearly upsampled LR features, the same paired patches (the stage-2 loader of the demo
  overlay), Adam at the demo learning rate, trained for the same total budget; validation PSNR every
  ``--val-every`` iterations on the validation subjects (sliding window), best kept; ``<out>/unet_b2.pt``.
- ``evaluate``: the shipped (or ``--models``) weights through ``inference.json`` + ``evaluate.json`` +
  ``demo.json`` exactly as a user runs them, DDIM 100 / 50 / 25 / 10 (time and metrics each), the B2 UNet and
  B1 (AMICO fitted on the trilinearly upsampled LR DWI) on the held-out phantoms with the same metric code
  (``scripts.evaluation.case_metrics``); ``results.json``, ``results.md`` and ``learning_curves.png``.

Run ``train`` and ``baseline`` side by side, one CPU thread each, so both get the same wall clock and the same
compute (the card's command)::

    python -m common.data.noddi_phantom DATA --n_train 24 --n_val 2 --n_test 2 --seed 0 --scheme hcp \\
        --snr_range 15 40 --deform_magnitude_mm 2 6 --n_jobs 2
    python benchmarks/noddi_sr_demo.py train --data DATA --out RUN --budget-s 3900 --threads 1 &
    python benchmarks/noddi_sr_demo.py baseline --data DATA --out RUN --budget-s 3900 --threads 1 &
    wait
    python benchmarks/noddi_sr_demo.py evaluate --data DATA --out RUN/eval --models RUN/models --unet RUN/unet_b2.pt \\
        --curves RUN

``--overlay tiny.json`` stacks a further overlay after ``demo.json`` and ``--set KEY=VALUE`` overrides a config key in
every workflow of a sub-command (the tests run all three sub-commands on the tiny overlay in seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "noddi_sr"
for _p in (str(REPO), str(BUNDLE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.demo_training import (  # noqa: E402
    add_overlay_options, bundle_workflow, overlays, plot_learning_curves, train_baseline, train_stage,
)
from benchmarks.noddi_sr import _amico_maps, _upsample_dwi, b2_predict, b2_train_step, b2_unet  # noqa: E402

STAGES = {"vqgan": "train_vqgan.json", "cond_encoder": "train_cond_encoder.json", "diffusion": "train_diffusion.json"}
STEPS = (100, 50, 25, 10)


def _workflow(files, wtype, **overrides):
    return bundle_workflow(BUNDLE, files, wtype, **overrides)


def cmd_train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shares = [float(s) for s in args.shares.split(",")]
    for stage, share in zip(STAGES, shares):
        extra = {} if args.epoch_length is None else {"epoch_length": args.epoch_length}
        c = train_stage(BUNDLE, [STAGES[stage], *overlays(args)], stage, out, args.budget_s * share / sum(shares),
                        dataset_dir=str(args.data), **{**extra, **args.set})
        print(f"[{stage}] done: {c['wall_s']:.0f} s, best val PSNR {c['best_val_psnr']}", flush=True)


def cmd_baseline(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wf = _workflow(["train_cond_encoder.json", *overlays(args)], "train", dataset_dir=str(args.data),
                   ckpt_dir=str(out / "b2_unused"), output_dir=str(out / "out_b2"), overwrite=True, **args.set)
    p = wf.parser
    loader = p.get_parsed_content("train#dataloader")
    val_loader = p.get_parsed_content("validate#dataloader")
    post = p.get_parsed_content("validate#postprocessing")
    roi, lr, n_feat = p.get_parsed_content("lr_patch"), float(p.get_parsed_content("learning_rate")), int(p.get_parsed_content("n_feat"))
    torch.manual_seed(0)
    unet = b2_unet(n_feat)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)

    def validate():
        unet.eval()
        vals = []
        with torch.no_grad():
            for batch in val_loader:
                pred = b2_predict(unet, batch["image"], roi, float(p["val_overlap"]))
                d = post({"pred": pred[0], "image": batch["image"][0], "mask_hr": batch["mask_hr"][0]})
                mse = torch.mean((d["pred"].float() - batch["label"][0].float()) ** 2)
                vals.append(float(10 * torch.log10(1.0 / mse)))
        unet.train()
        return float(np.mean(vals))

    def save(iteration):
        torch.save({"unet": unet.state_dict(), "n_feat": n_feat, "iteration": iteration}, out / "unet_b2.pt")

    curve = train_baseline(loader, lambda batch: b2_train_step(unet, opt, batch), validate, save, args.budget_s,
                           args.val_every, "b2")
    (out / "curves_b2.json").write_text(json.dumps(curve))


def _amico_b1(entry: dict, data: Path, work: Path) -> np.ndarray:
    import nibabel as nib

    work.mkdir(parents=True, exist_ok=True)
    up = _upsample_dwi(data / entry["dwi"], work / "dwi_up.nii.gz")
    mask = nib.load(data / entry["mask_hr"]).get_fdata() > 0
    return _amico_maps(up, data / entry["bval"], data / entry["bvec"], data / entry["mask_hr"], work / "fit") * mask


def _summarise(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["map"], r["mask"]), []).append(r)
    return [{"method": m, "map": mp, "mask": mk, "n_cases": len(rs),
             **{f"{k}_mean": float(np.nanmean([r[k] for r in rs])) for k in ("psnr", "ssim", "mae")}}
            for (m, mp, mk), rs in groups.items()]


def cmd_evaluate(args) -> None:
    import nibabel as nib

    from common.transforms.dwi import HRMapsd
    from scripts.evaluation import case_metrics

    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    datalist = json.loads((data / "datalist.json").read_text())
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "command": "python benchmarks/noddi_sr_demo.py " + " ".join(sys.argv[1:]), "ddim": {}, "rows": []}
    models = {} if args.models is None else {"ckpt_dir": str(args.models)}
    for steps in args.steps:
        t = time.perf_counter()
        wf = _workflow(["inference.json", "evaluate.json", *overlays(args)], "eval", dataset_dir=str(data),
                       output_dir=str(out / f"ddim{steps}"), ddim_steps=steps, progress=False, overwrite=True,
                       **{**args.set, **models})
        wf.run()
        wf.finalize()
        wall = time.perf_counter() - t
        summ = json.loads((out / f"ddim{steps}" / "summary.json").read_text())
        summ = summ if isinstance(summ, list) else summ.get("summary", summ)
        results["ddim"][steps] = {"wall_s": wall, "summary": summ}
        print(f"DDIM {steps}: {wall:.0f} s", flush=True)

    rows = []
    wf = _workflow(["inference.json", "evaluate.json", *overlays(args)], "eval", dataset_dir=str(data),
                   output_dir=str(out / "b2"), progress=False, overwrite=True, **{**args.set, **models})
    pre = wf.parser.get_parsed_content("preprocessing")
    roi, overlap = wf.parser.get_parsed_content("lr_patch"), float(wf.parser["overlap"])
    unet = None
    if args.unet:
        ck = torch.load(args.unet, weights_only=True)
        unet = b2_unet(int(ck["n_feat"]))
        unet.load_state_dict(ck["unet"])
        unet.eval()
        results["b2_iteration"] = int(ck["iteration"])
    for entry in datalist["test"]:
        ref = np.moveaxis(nib.load(data / entry["noddi"]).get_fdata(), -1, 0)
        masks = {k: nib.load(data / entry[e]).get_fdata() > 0 for k, e in (("brain", "mask_hr"), ("wm", "wm"), ("gm", "gm"))}
        if unet is not None:
            item = pre({k: (v if k == "id" else str(data / v)) for k, v in entry.items()})
            with torch.no_grad():
                pred = b2_predict(unet, item["image"][None], roi, overlap)
            hr = torch.as_tensor(masks["brain"][None].astype(np.float32))
            post = HRMapsd("pred", ref_key="image", mask_key=None, hr_mask_key="mask_hr")({"pred": pred[0], "image": item["image"], "mask_hr": hr})
            rows += case_metrics(np.asarray(post["pred"], dtype=np.float64), ref, masks, entry["id"], "b2_unet")
        if not args.no_amico:
            maps = _amico_b1(entry, data, out / "amico" / entry["id"])
            rows += case_metrics(maps.astype(np.float64), ref, masks, entry["id"], "b1_amico_lr_up")
    results["rows"] = rows
    results["baselines"] = _summarise(rows)
    results["subject_snr"] = {e["id"]: datalist.get("subject_snr", {}).get(e["id"]) for e in datalist["test"]}
    if args.curves:
        results["curves"] = {p.stem.replace("curves_", ""): json.loads(p.read_text()) for p in sorted(Path(args.curves).glob("curves_*.json"))}
        plot_learning_curves(results["curves"], out / "learning_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    def pick(summary, method_filter=None):
        table = {}
        for r in summary:
            if r["mask"] == "brain" or r["map"] == "all":
                if method_filter is None or method_filter(r["method"]):
                    table.setdefault(r["method"], {})[r["map"]] = r
        return table

    lines = [f"{results['date']}, {results['machine']}; command: `{results['command']}`", "",
             "| method | NDI PSNR / SSIM | ODI PSNR / SSIM | FWF PSNR / SSIM | CLDM PSNR / SSIM | wall (s) |",
             "|---|---|---|---|---|---|"]

    def row(name, maps, wall=""):
        cell = lambda m: f"{maps[m]['psnr_mean']:.2f} / {maps[m]['ssim_mean']:.3f}" if m in maps else "-"  # noqa: E731
        lines.append(f"| {name} | {cell('NDI')} | {cell('ODI')} | {cell('FWF')} | {cell('all')} | {wall} |")

    for steps, d in results["ddim"].items():
        for _, maps in pick(d["summary"]).items():
            row(f"ours, DDIM {steps}", maps, f"{d['wall_s']:.0f}")
    for method, maps in pick(results["baselines"]).items():
        row(method, maps)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "baseline", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--threads", type=int, default=1)
        add_overlay_options(s)
        if name != "evaluate":
            s.add_argument("--budget-s", type=float, default=3900.0)
    sub.choices["train"].add_argument("--shares", default="20,15,30", help="budget shares of the three stages")
    sub.choices["train"].add_argument("--epoch-length", type=int, default=None, help="iterations per epoch (demo.json: 100)")
    sub.choices["baseline"].add_argument("--val-every", type=int, default=200)
    ev = sub.choices["evaluate"]
    ev.add_argument("--models", default=None, help="folder of vqgan.pt/encoder.pt/diffusion.pt (default: the shipped ones)")
    ev.add_argument("--unet", default=None)
    ev.add_argument("--curves", default=None)
    ev.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ev.add_argument("--no_amico", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"train": cmd_train, "baseline": cmd_baseline, "evaluate": cmd_evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
