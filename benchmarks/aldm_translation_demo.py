#!/usr/bin/env python
"""The aldm_translation demo model: train its three stages and a UNet baseline at one wall-clock budget, evaluate.

Sub-commands, each writing into ``--out`` (``--data``: the folder of the demo cohort's ``datalist.json``, or the
``--out`` folder of ``common.data.demo``, which holds it under ``brain_mri/``):

- ``train``: the bundle's three training configs with the demo overlay (``train_<stage>.json`` + ``demo.json``) on
  the simulated brain cohort, one stage after the other. Each stage stops at the end of the first epoch after its
  share of the budget: ``--budget-s`` split by ``--shares``, and what a stage leaves unused (or overruns) is
  shared again among the stages after it, so the three stages together stop within the budget plus the last
  stage's final epoch. Stage 1 keeps its best-validation weights (``autoencoder_best.pt``; reconstruction PSNR of
  every modality of the validation subjects), which stages 2 and 3 then load. Learning curves (training loss every
  10 iterations, validation PSNR at every validation) go to ``<out>/curves_<stage>.json``, weights to
  ``<out>/models``.
- ``baseline``: a 3D UNet regression (MONAI ``BasicUNet``, input the source plus one constant map per modality, 1
  for the target; L1; the UNet of ``benchmarks/aldm_translation.py``) on the same data and loader as stage 2 (whole
  volumes on the demo grid, every modality of a subject, one random ordered pair per step), Adam, for the whole
  ``--budget-s``; validation PSNR (mean over the six directions of the validation subjects) every
  ``--val-every`` iterations, the best weights kept in ``<out>/unet.pt``; ``<out>/curves_unet.json``.
- ``export``: the trained weights as the shipped files (plain state dicts, name -> tensor, loadable with
  ``weights_only=True``): ``autoencoder.pt`` (the VQ-GAN the later stages were trained on), ``spade.pt``,
  ``diffusion.pt`` (the EMA UNet and the latent scale, keys ``ema.*`` and ``step.scale_factor``, the entries
  inference.json loads); prints their sha256 and, with ``--update-overlay``, writes them
  into ``configs/demo.json`` (``demo_sha256``), so every load from ``models/demo`` verifies them.
- ``evaluate``: the shipped (or ``--models``) weights through ``evaluate.json`` + ``demo.json`` as a user runs
  them, on the six directions of the two simulated validation subjects (in domain; ``test_split`` validation) and
  of the real avg152 T1/T2/PD triple (``test``): ``spade_only`` and DDIM (eta 1) at 200 / 100 / 50 / 25 steps on
  avg152 (time per translated volume and metrics each), DDIM 200 in domain. Baselines on the same preprocessed
  grid, scored by the same function as the evaluation (``scripts.evaluate.translation_scores``): the source
  histogram-matched to the target inside the brain mask (given the target's histogram, so optimistic) and the
  UNet of ``baseline``. Writes ``results.json``, ``results.md`` (tables and the issue's bars) and
  ``learning_curves.png``.
- ``diagnose``: where a trained model loses quality, on one case (``--case``, e.g. ``validation:0`` or ``test:0``):
  per direction, the VQ-GAN reconstruction of the target, SPADE only, the denoiser's one-step estimate from the
  true noised target at several noise levels, DDIM from z_T (eta 0 and 1) and DDIM from the noised SPADE latent
  (an SDEdit-style start); ``diagnosis.json`` / ``diagnosis.md``.

The demo model (issue 14 item 1), on a 2-core CPU: ``train`` and ``baseline`` side by side, one torch thread each,
so both get the same wall clock and the same compute::

    python -m common.data.demo --what brain_mri --n-train 16 --n-val 2 --seed 0 --out DATA
    OMP_NUM_THREADS=1 python benchmarks/aldm_translation_demo.py train --data DATA --out RUN --budget-s 5400 &
    OMP_NUM_THREADS=1 python benchmarks/aldm_translation_demo.py baseline --data DATA --out RUN --budget-s 5400 &
    wait
    OMP_NUM_THREADS=1 python benchmarks/aldm_translation_demo.py export --run RUN --dest bundles/aldm_translation/models/demo --update-overlay
    OMP_NUM_THREADS=2 python benchmarks/aldm_translation_demo.py evaluate --data DATA --out RUN/eval --unet RUN/unet.pt --curves RUN --threads 2

Sizing of ``demo.json`` and of the default ``--shares 45,20,35`` (seconds per training iteration, one torch thread,
2-core CPU, measured on a 4-subject cohort of the same images; first number with the other core idle, second with
it busy, as when ``baseline`` runs beside):
stage 1 (VQ-GAN on a 96 x 112 x 32 slab) 2.4 / 3.3, stage 2 (48-slice slab, two frozen encodes per step) 1.25 / 1.7,
stage 3 (48-slice slab) 1.6 / 2.2; validations 24 s (stage 1, every 200 iterations), 51 s (stage 2, every 250) and
87 s (stage 3, DDIM 10 on 12 directions, every 300). At 5400 s that is about 700 / 550 / 750 iterations with the
baseline running beside (about 950 / 750 / 1000 alone); the UNet baseline makes about 3.5 s per iteration.
DDIM sampling costs about 0.3 s per UNet step on the whole 24 x 28 x 24 latent, so ``evaluate`` takes about half an
hour on one thread.

(``evaluate`` without ``--models`` reads the exported files in ``models/demo`` through the overlay's sha256 check;
``--models RUN/models`` evaluates the trainer checkpoints before export.) ``--overlay tiny.json`` stacks a further
overlay after ``demo.json`` and ``--set KEY=VALUE`` overrides a config key in every workflow (the tests run all
sub-commands on the tiny overlay in seconds).
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

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "aldm_translation"
for _p in (str(REPO), str(BUNDLE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.aldm_translation import (  # noqa: E402
    UNET_FEATURES,
    _test_items,
    unet_net,
    unet_predict,
    unet_train_step,
)
from benchmarks.demo_training import (  # noqa: E402
    add_overlay_options, bundle_workflow, overlays, plot_learning_curves, train_baseline, train_stage,
)

STAGES = {"autoencoder": "train_autoencoder.json", "spade": "train_spade.json", "diffusion": "train_diffusion.json"}
#: the files ``export`` writes into ``models/demo`` (the names the overlay's ``*_ckpt`` keys read)
SHIPPED = {"autoencoder": "autoencoder.pt", "spade": "spade.pt", "diffusion": "diffusion.pt"}
STEPS = (200, 100, 50, 25)
#: evaluation sets: name -> ``test_split`` of evaluate.json
SPLITS = {"in_domain": "validation", "avg152": "test"}
#: the issue's bars: (a) in domain, DDIM 200, mean masked PSNR / SSIM over the six directions
BAR_IN_DOMAIN = {"psnr_mask": 28.0, "ssim_mask": 0.90}


def dataset_dir(data) -> Path:
    """The folder of ``datalist.json``: ``data`` itself or ``data/brain_mri`` (``common.data.demo --out data``)."""
    data = Path(data)
    for folder in (data, data / "brain_mri"):
        if (folder / "datalist.json").is_file():
            return folder
    raise SystemExit(f"no datalist.json in {data} or {data / 'brain_mri'}: build the cohort with "
                     "python -m common.data.demo --what brain_mri --n-train 16 --n-val 2 --seed 0 --out DATA")


def _workflow(files, wtype, **overrides):
    return bundle_workflow(BUNDLE, files, wtype, **overrides)


# ----------------------------------------------------------------------------------------------------- training
def stage_budgets(budget_s: float, shares: dict[str, float], spent: dict[str, float], stage: str) -> float:
    """The budget of ``stage``: what the stages before it left of ``budget_s``, shared among the remaining stages
    in proportion to their ``shares`` (``spent``: wall seconds of the stages already run)."""
    names = list(shares)
    rest = names[names.index(stage):]
    left = budget_s - sum(spent.values())
    return max(0.0, left) * shares[stage] / sum(shares[s] for s in rest)


def cmd_train(args) -> None:
    out, data = Path(args.out), dataset_dir(args.data)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    shares = dict(zip(STAGES, (float(s) for s in args.shares.split(","))))
    if len(shares) != 3:
        raise SystemExit(f"--shares needs three numbers (autoencoder, spade, diffusion), got {args.shares!r}")
    overrides = args.set
    stages = list(STAGES) if args.stages is None else args.stages.split(",")
    spent: dict[str, float] = {}
    summary = {"budget_s": args.budget_s, "shares": shares, "stages": {}}
    for stage in STAGES:
        if stage not in stages:
            continue
        # the stage-1 weights the later stages load: the best validated ones (a stage 1 stopped before its first
        # validation has none: then its final weights)
        autoencoder = models / "autoencoder_best.pt"
        if args.autoencoder == "last" or not autoencoder.is_file():
            autoencoder = models / "autoencoder.pt"
        summary["autoencoder_used"] = autoencoder.name
        chain = {  # each stage reads what the previous one wrote here (no sha256: not the shipped files)
            "autoencoder": {},
            "spade": {"autoencoder_ckpt": str(autoencoder)},
            "diffusion": {"autoencoder_ckpt": str(autoencoder), "spade_ckpt": str(models / "spade.pt")},
        }
        budget = stage_budgets(args.budget_s, {s: shares[s] for s in stages}, spent, stage)
        c = train_stage(BUNDLE, [STAGES[stage], *overlays(args)], stage, out, budget, dataset_dir=str(data),
                        **chain[stage], **overrides)
        spent[stage] = c["wall_s"]
        summary["stages"][stage] = {"budget_s": budget, "wall_s": c["wall_s"], "iterations": c["iterations"],
                                    "best_val_psnr": c["best_val_psnr"]}
        print(f"[{stage}] done: {c['iterations']} iterations in {c['wall_s']:.0f} s (budget {budget:.0f} s), "
              f"best val PSNR {c['best_val_psnr']}", flush=True)
    summary["wall_s"] = sum(spent.values())
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))


def _psnr(pred: np.ndarray, target: np.ndarray) -> float:
    from common.metrics.image import psnr

    return psnr(np.clip(pred, 0.0, 1.0), target, data_range=1.0)


def cmd_baseline(args) -> None:
    """The UNet regression at the whole budget: the stage-2 loader of the overlay, validation on the validation
    subjects' six directions (evaluate.json preprocessing), best weights kept."""
    out, data = Path(args.out), dataset_dir(args.data)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    overrides = args.set
    wf = _workflow(["train_spade.json", *overlays(args)], "train", dataset_dir=str(data),
                   ckpt_dir=str(out / "unet_unused"), output_dir=str(out / "out_unet"), overwrite=True, **overrides)
    p = wf.parser
    loader = p.get_parsed_content("train#dataloader")
    modalities = list(p.get_parsed_content("modalities"))
    lr = float(args.lr)
    val_items = _test_items(overlays(args), str(data), test_split="validation", **overrides)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    net = unet_net(len(modalities)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def validate() -> float:
        return float(np.mean([_psnr(unet_predict(net, v["x"], v["target"], modalities, device), v["y"]) for v in val_items]))

    def save(iteration: int) -> None:
        torch.save({"unet": net.state_dict(), "features": list(UNET_FEATURES), "modalities": modalities,
                    "iteration": iteration}, out / "unet.pt")

    curve = train_baseline(loader, lambda batch: unet_train_step(net, opt, batch, modalities, device), validate, save,
                           args.budget_s, args.val_every, "unet", started=t0)
    curve["parameters"] = sum(q.numel() for q in net.parameters())
    (out / "curves_unet.json").write_text(json.dumps(curve))


def load_unet(path) -> tuple[torch.nn.Module, list[str], int]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    net = unet_net(len(ck["modalities"]), ck["features"])
    net.load_state_dict(ck["unet"])
    return net.eval(), list(ck["modalities"]), int(ck["iteration"])


# ------------------------------------------------------------------------------------------------------- export
def _state(ckpt: dict, entry: str) -> dict:
    """Entry ``entry`` of a trainer checkpoint, or the checkpoint itself when it is a plain state dict."""
    state = ckpt[entry] if entry in ckpt else ckpt
    return {k: v.detach().clone().contiguous() if torch.is_tensor(v) else v for k, v in state.items()}


def cmd_export(args) -> dict:
    from common.data.fetch import sha256sum
    from common.utils.io import atomic_write

    run, dest = Path(args.run), Path(args.dest)
    models = run / "models"
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    ae_file = models / summary.get("autoencoder_used", "autoencoder_best.pt")
    if not ae_file.is_file():
        ae_file = models / "autoencoder.pt"
    load = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    diffusion = load(models / "diffusion.pt")
    objects = {
        "autoencoder": _state(load(ae_file), "autoencoder"),
        "spade": _state(load(models / "spade.pt"), "spade"),
        # one plain state dict for the two objects inference.json loads from it: "<entry>.<key>"
        "diffusion": {f"{entry}.{k}": v for entry in ("ema", "step") for k, v in _state(diffusion, entry).items()},
    }
    dest.mkdir(parents=True, exist_ok=True)
    digests = {}
    for stage, obj in objects.items():
        target = dest / SHIPPED[stage]
        with atomic_write(target, "wb") as fh:
            torch.save(obj, fh)
        digests[SHIPPED[stage]] = sha256sum(target)
        print(f"{target}: {target.stat().st_size / 2**20:.2f} MiB (from {ae_file.name if stage == 'autoencoder' else SHIPPED[stage]})",
              flush=True)
    print(json.dumps({"demo_sha256": digests}, indent=4))
    if args.update_overlay:
        overlay = BUNDLE / "configs" / "demo.json"
        config = json.loads(overlay.read_text())
        config["demo_sha256"] = digests
        overlay.write_text(json.dumps(config, indent=4) + "\n")
        print(f"demo_sha256 written into {overlay}")
    return digests


# ----------------------------------------------------------------------------------------------------- evaluate
def _mean_rows(per_direction: dict) -> dict:
    keys = next(iter(per_direction.values())).keys()
    return {k: float(np.mean([r[k] for r in per_direction.values()])) for k in keys}


def evaluate_aldm(data: Path, split: str, out: Path, mode: str, steps: int | None, args) -> dict:
    """One run of ``evaluate.json`` + the overlay(s) on ``split``; its per-direction means, time per volume."""
    from scripts.evaluate import METRICS

    overrides = {"dataset_dir": str(data), "test_split": split, "output_dir": str(out), "mode": mode,
                 "overwrite": True, "progress": False, "montage": not args.no_montage, **args.set}
    if steps is not None:
        overrides["num_inference_steps"] = steps
    if args.models is not None:
        overrides["ckpt_dir"] = str(args.models)
    t = time.perf_counter()
    wf = _workflow(["evaluate.json", *overlays(args)], "infer", **overrides)
    wf.run()
    wf.finalize()
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    per_dir = {k: {m: v[m]["mean"] for m in METRICS} for k, v in summary.items() if k != "all"}
    with open(out / "metrics.csv") as fh:  # one row per case and direction
        rows = list(csv.DictReader(fh))
    per_case = {c: {m: float(np.mean([float(r[m]) for r in rows if r["id"] == c])) for m in METRICS}
                for c in dict.fromkeys(r["id"] for r in rows)}
    return {"per_direction": per_dir, "per_case": per_case, "mean": {m: summary["all"][m]["mean"] for m in METRICS},
            "wall_s": wall, "seconds_per_volume": wall / max(1, summary["all"]["psnr"]["n"]),
            "n": summary["all"]["psnr"]["n"]}


def evaluate_baselines(items: list[dict], unet=None) -> dict:
    """Histogram matching and the UNet on the evaluation's own preprocessed items, scored by its function."""
    from scripts.evaluate import translation_scores

    from common.transforms.intensity import histogram_matched

    rows: dict[str, list] = {"histmatch": []}
    if unet is not None:
        rows["unet"] = []
    for it in items:
        key = (f"{it['source']}2{it['target']}", str(it["id"]))
        rows["histmatch"].append((key, translation_scores(histogram_matched(it["x"], it["y"], it["mask"]), it["y"], it["mask"])))
        if unet is not None:
            net, modalities = unet
            pred = unet_predict(net, it["x"], it["target"], modalities)
            rows["unet"].append((key, translation_scores(pred, it["y"], it["mask"])))
    out = {}
    for method, scored in rows.items():
        group = lambda i: {k: [r for (key, r) in scored if key[i] == k] for k in dict.fromkeys(key[i] for key, _ in scored)}  # noqa: E731
        mean = lambda rs: {m: float(np.mean([r[m] for r in rs])) for m in rs[0]}  # noqa: E731
        per_dir = {d: mean(rs) for d, rs in group(0).items()}
        out[method] = {"per_direction": per_dir, "per_case": {c: mean(rs) for c, rs in group(1).items()},
                       "mean": _mean_rows(per_dir)}
    return out


def reference_run(aldm: dict) -> str:
    """The run the bars are read on: DDIM 200 (the configs' default), else the most DDIM steps, else spade_only."""
    ddim = sorted((int(k[4:]) for k in aldm if k.startswith("ddim")), reverse=True)
    return "ddim200" if 200 in ddim else (f"ddim{ddim[0]}" if ddim else "spade_only")


def bars(results: dict) -> dict:
    """The issue's bars: (a) in domain, mean masked PSNR / SSIM at least ``BAR_IN_DOMAIN``; (b) on avg152, mean
    masked PSNR and SSIM above every baseline."""
    out = {}
    dom = results["splits"].get("in_domain")
    if dom:
        ref = reference_run(dom["aldm"])
        out["in_domain"] = {m: {"run": ref, "value": dom["aldm"][ref]["mean"][m], "bar": b,
                                "pass": dom["aldm"][ref]["mean"][m] >= b} for m, b in BAR_IN_DOMAIN.items()}
    real = results["splits"].get("avg152")
    if real:
        ref = reference_run(real["aldm"])
        out["avg152"] = {}
        for m in ("psnr_mask", "ssim_mask"):
            value = real["aldm"][ref]["mean"][m]
            base = {b: r["mean"][m] for b, r in real["baselines"].items()}
            out["avg152"][m] = {"run": ref, "value": value, "bar": base, "pass": all(value > v for v in base.values())}
    framed = results["splits"].get("framings")
    if framed:  # every framing of avg152 on its own, against the baselines on the same framing
        ref = next(iter(framed["aldm"]))
        for case, row in framed["aldm"][ref]["per_case"].items():
            if case in out:  # the as-given case: its bar is the avg152 split's, at the reference steps
                continue
            out[case] = {}
            for m in ("psnr_mask", "ssim_mask"):
                base = {b: r["per_case"][case][m] for b, r in framed["baselines"].items()}
                out[case][m] = {"run": ref, "value": row[m], "bar": base, "pass": all(row[m] > v for v in base.values())}
    return out


def cmd_evaluate(args) -> dict:
    out, data = Path(args.out), dataset_dir(args.data)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "command": "python benchmarks/aldm_translation_demo.py " + " ".join(args.argv),
               "models": str(args.models or "models/demo (shipped, sha256 checked)"), "splits": {}}
    unet = None
    if args.unet:
        net, modalities, iteration = load_unet(args.unet)
        unet = (net, modalities)
        results["unet_iteration"] = iteration
    plan = {"in_domain": args.in_domain_steps, "avg152": args.steps}
    for name, split in SPLITS.items():
        if name not in args.sets:
            continue
        res = {"aldm": {}}
        runs = ([] if args.no_spade_only else [("spade_only", None)]) + [("diffusion", s) for s in plan[name]]
        for mode, steps in runs:
            key = mode if steps is None else f"ddim{steps}"
            res["aldm"][key] = evaluate_aldm(data, split, out / name / key, mode, steps, args)
            m = res["aldm"][key]["mean"]
            print(f"[{name}] {key}: masked PSNR {m['psnr_mask']:.2f} SSIM {m['ssim_mask']:.4f}, "
                  f"{res['aldm'][key]['seconds_per_volume']:.1f} s per volume", flush=True)
        items = _test_items(overlays(args), str(data), test_split=split, **args.set)
        res["baselines"] = evaluate_baselines(items, unet)
        results["splits"][name] = res
    if "framings" in args.sets:  # avg152 as users' scans are framed: larger field of view, thin slab
        from common.data.demo import build_brain_framings

        root = build_brain_framings(data / "datalist.json", out).parent
        key = f"ddim{args.framing_steps}"
        res = {"aldm": {key: evaluate_aldm(root, "test", out / "framings" / key, "diffusion", args.framing_steps, args)}}
        m = res["aldm"][key]["per_case"]
        print("[framings] " + ", ".join(f"{c}: masked PSNR {v['psnr_mask']:.2f}" for c, v in m.items()), flush=True)
        items = _test_items(overlays(args), str(root), test_split="test", **args.set)
        res["baselines"] = evaluate_baselines(items, unet)
        results["splits"]["framings"] = res
    results["bars"] = bars(results)
    if args.curves:
        results["curves"] = {p.stem.replace("curves_", ""): json.loads(p.read_text())
                             for p in sorted(Path(args.curves).glob("curves_*.json"))}
        if results["curves"]:
            plot_learning_curves(results["curves"], out / "learning_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


# ---------------------------------------------------------------------------------------------------- diagnosis
DIAG_DIRECTIONS = {f"{a}2{b}": (a, b) for a in ("t1", "t2", "pd") for b in ("t1", "t2", "pd") if a != b}


def cmd_diagnose(args) -> dict:
    """Where a trained model loses quality, per direction on one case, PSNR inside ``source > 0.02`` (after the
    inference preprocessing): the VQ-GAN reconstruction of the target (the ceiling of every latent route), SPADE
    only, the denoiser's one-step estimate x̂0 from the true noised target latent at each ``--t`` (what it has
    learnt at each noise level), DDIM from z_T at eta 0 and 1 (the paper's sampler), and DDIM started from the
    SPADE latent noised to each ``--start`` (an SDEdit-style start, not the paper's sampler). Writes
    ``diagnosis.json`` and ``diagnosis.md``."""
    from common.engines.aldm_steps import encode_quantized
    from common.inferers.latent_diffusion import set_sampling_timesteps
    from scripts.inferer import target_condition

    out, data = Path(args.out), dataset_dir(args.data)
    out.mkdir(parents=True, exist_ok=True)
    split, _, index = args.case.partition(":")
    case = json.loads((data / "datalist.json").read_text())[split][int(index or 0)]
    overrides = {"progress": False, "input_image": str(data / case["t1"]), "output_dir": str(out / "unused"),
                 **args.set}
    if args.models is not None:
        overrides["ckpt_dir"] = str(args.models)
    wf = _workflow(["inference.json", *overlays(args)], "infer", **overrides)
    p = wf.parser
    net, inferer, ldm = (p.get_parsed_content(k) for k in ("network", "inferer", "diffusion_model"))
    for handler in p.get_parsed_content("handlers"):  # the checkpoint loaders, as the evaluator's start runs them
        if hasattr(handler, "load_path"):
            handler(wf.evaluator)
    net.eval()
    ldm.eval()
    pre, scheduler = p.get_parsed_content("preprocessing"), p.get_parsed_content("noise_scheduler")
    images = {m: pre({"image": str(data / case[m])})["image"][None].as_tensor() for m in ("t1", "t2", "pd")}
    s, steps = float(inferer.scale_factor), int(args.steps)
    rows = {}
    with torch.no_grad():
        for direction in args.directions:
            src, tgt = DIAG_DIRECTIONS[direction]
            x_src, x_tgt, mask = images[src], images[tgt], images[src] > 0.02
            psnr = lambda z: float(10 * torch.log10(1.0 / ((net.decode(z).clamp(0, 1) - x_tgt)[mask] ** 2).mean()))  # noqa: E731
            z_src = net.encode(x_src)
            c, z0 = net.translate_latent(z_src, tgt), encode_quantized(net.autoencoder, x_tgt)
            cond = torch.cat([s * z_src, s * c], dim=1)
            kw = target_condition(tgt, inferer.modalities, inferer.conditioning, batch_size=1, device="cpu")
            row = {"reconstruction": psnr(z0), "spade_only": psnr(c)}
            g = torch.Generator().manual_seed(args.seed)
            for t in args.t:  # one-step estimate from the true noised target
                z_t = scheduler.add_noise(s * z0, torch.randn(z0.shape, generator=g), torch.tensor([t]))
                eps = ldm(torch.cat([cond, z_t], dim=1), torch.tensor([t]), **kw)
                a = scheduler.alphas_cumprod[t]
                row[f"x0_t{t}"] = psnr((z_t - (1 - a).sqrt() * eps) / a.sqrt() / s)

            for eta in (0.0, 1.0):  # the bundle's own sampler, from z_T
                z = inferer.sampler(cond, ldm, seed=args.seed, num_inference_steps=steps, eta=eta, **kw)
                row[f"ddim{steps}_eta{eta:g}"] = psnr(z / s)
            for start in args.start:  # the same DDIM steps from the noised SPADE latent (the sampler starts at z_T)
                g = torch.Generator().manual_seed(args.seed)
                ts = set_sampling_timesteps(scheduler, steps, inferer.sampler.timestep_spacing)
                ts = ts[ts <= start]
                z = scheduler.add_noise(s * c, torch.randn(c.shape, generator=g), ts[:1])
                for t in ts:
                    eps = ldm(torch.cat([cond, z], dim=1), torch.full((1,), int(t)), **kw)
                    z, _ = scheduler.step(eps, int(t), z, eta=0.0)
                row[f"start{start}"] = psnr(z / s)
            rows[direction] = row
            print(direction, {k: round(v, 2) for k, v in row.items()}, flush=True)
    cols = list(next(iter(rows.values())))
    rows["mean"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in cols}
    result = {"case": case["id"], "split": split, "scale_factor": s, "command": "python benchmarks/aldm_translation_demo.py "
              + " ".join(args.argv), "psnr": rows}
    (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
    md = [f"case {case['id']} ({split}); PSNR (dB) inside source > 0.02; `{result['command']}`", "",
          "| direction | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {d} | " + " | ".join(f"{r[k]:.2f}" for k in cols) + " |" for d, r in rows.items()]
    (out / "diagnosis.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def markdown(results: dict) -> str:
    lines = [f"{results['date']}, {results['machine']}; command: `{results['command']}`; weights: {results['models']}", ""]
    for name, res in results["splits"].items():
        rows = [(f"ALDM {k}", v) for k, v in res["aldm"].items()] + [(f"baseline {k}", v) for k, v in res["baselines"].items()]
        if name == "framings":  # one row per method, one column per framing of avg152 (mean over the six directions)
            cases = list(rows[0][1]["per_case"])
            lines += ["**avg152 re-framed** (masked PSNR dB / masked SSIM, mean over the six directions)", "",
                      "| method | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
            for label, r in rows:
                lines.append(f"| {label} | " + " | ".join(f"{r['per_case'][c]['psnr_mask']:.2f} / {r['per_case'][c]['ssim_mask']:.3f}"
                                                          for c in cases) + " |")
            lines.append("")
            continue
        dirs = list(rows[0][1]["per_direction"]) if rows else []
        lines += [f"**{name}** (masked PSNR dB / masked SSIM; per direction and mean)", "",
                  "| method | " + " | ".join(dirs) + " | mean | s / volume |", "|---" * (len(dirs) + 3) + "|"]
        for label, r in rows:
            cells = [f"{r['per_direction'][d]['psnr_mask']:.2f} / {r['per_direction'][d]['ssim_mask']:.3f}" for d in dirs]
            sec = f"{r['seconds_per_volume']:.1f}" if "seconds_per_volume" in r else ""
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['mean']['psnr_mask']:.2f} / {r['mean']['ssim_mask']:.3f} | {sec} |")
        lines.append("")
    real = results["splits"].get("avg152")
    if real:
        lines += ["**DDIM steps on avg152** (eta 1; mean over the six directions)", "",
                  "| sampler | s / volume | PSNR (dB) | masked PSNR (dB) | masked SSIM |", "|---|---|---|---|---|"]
        for k, r in real["aldm"].items():
            lines.append(f"| {k} | {r['seconds_per_volume']:.1f} | {r['mean']['psnr']:.2f} | {r['mean']['psnr_mask']:.2f} | "
                         f"{r['mean']['ssim_mask']:.3f} |")
        lines.append("")
    for name, b in results.get("bars", {}).items():
        for m, v in b.items():
            ref = v["bar"] if not isinstance(v["bar"], dict) else ", ".join(f"{b} {x:.3f}" for b, x in v["bar"].items())
            lines.append(f"- bar {name} {m} ({v['run']}): {v['value']:.3f} against {ref}: {'pass' if v['pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "baseline", "evaluate", "export", "diagnose"):
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=1, help="torch threads")
        if name == "export":
            continue
        s.add_argument("--data", required=True, help="folder of the cohort's datalist.json (or its parent)")
        s.add_argument("--out", required=True)
        add_overlay_options(s)
        if name in ("train", "baseline"):
            s.add_argument("--budget-s", type=float, default=5400.0, help="wall-clock budget, seconds")
    tr = sub.choices["train"]
    tr.add_argument("--shares", default="45,20,35", help="budget shares of autoencoder, spade, diffusion")
    tr.add_argument("--stages", default=None, help="comma-separated subset of the stages (default: all three)")
    tr.add_argument("--autoencoder", choices=("best", "last"), default="best",
                    help="stage-1 weights the later stages load (and export ships)")
    bl = sub.choices["baseline"]
    bl.add_argument("--val-every", type=int, default=50)
    bl.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (benchmarks/aldm_translation.py's)")
    bl.add_argument("--seed", type=int, default=0)
    ex = sub.choices["export"]
    ex.add_argument("--run", required=True, help="the --out folder of train")
    ex.add_argument("--dest", default=str(BUNDLE / "models" / "demo"))
    ex.add_argument("--update-overlay", action="store_true", help="write the digests into configs/demo.json")
    ev = sub.choices["evaluate"]
    ev.add_argument("--models", default=None, help="folder of autoencoder/spade/diffusion checkpoints (default: models/demo)")
    ev.add_argument("--unet", default=None, help="unet.pt of baseline")
    ev.add_argument("--curves", default=None, help="folder of curves_*.json (the train/baseline --out)")
    ev.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="DDIM steps on avg152")
    ev.add_argument("--in-domain-steps", type=int, nargs="*", default=[200], help="DDIM steps in domain")
    ev.add_argument("--sets", nargs="+", default=[*SPLITS, "framings"], choices=[*SPLITS, "framings"])
    ev.add_argument("--framing-steps", type=int, default=50, help="DDIM steps on the re-framed avg152 cases")
    ev.add_argument("--no-spade-only", action="store_true")
    ev.add_argument("--no-montage", action="store_true")
    dg = sub.choices["diagnose"]
    dg.add_argument("--models", default=None, help="folder of autoencoder/spade/diffusion checkpoints (default: models/demo)")
    dg.add_argument("--case", default="validation:0", help="SPLIT:INDEX of the datalist (test:0 = avg152)")
    dg.add_argument("--directions", nargs="+", default=list(DIAG_DIRECTIONS), choices=DIAG_DIRECTIONS)
    dg.add_argument("--t", type=int, nargs="+", default=[50, 250, 500, 900], help="noise levels of the one-step estimate")
    dg.add_argument("--start", type=int, nargs="*", default=[100, 250, 400], help="SDEdit-style start steps")
    dg.add_argument("--steps", type=int, default=50, help="DDIM steps (of the full schedule)")
    dg.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    for path in (str(REPO), str(BUNDLE)):  # the bundle's ``scripts`` package, as the configs import it
        if path not in sys.path:
            sys.path.insert(0, path)
    {"train": cmd_train, "baseline": cmd_baseline, "evaluate": cmd_evaluate, "export": cmd_export,
     "diagnose": cmd_diagnose}[args.cmd](args)


if __name__ == "__main__":
    main()
