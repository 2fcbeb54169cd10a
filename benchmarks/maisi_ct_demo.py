"""The maisi_ct demo model: train its three stages in a row at one wall-clock budget, export, evaluate.

* ``train``: ``train_autoencoder.json``, ``train_diffusion.json`` (rflow) and ``train_controlnet.json``, each with
  ``configs/demo.json``, on the CT demo cohort (``datalist_total.json``: the deformed copies of the TotalSegmentator
  example CT with their TotalSegmentator classes, mapped to MAISI ids by name). Each stage stops at the first epoch
  end after its share of the budget (``--budget-s`` split by ``--shares``) or at the overlay's ``max_epochs``;
  the diffusion stage encodes with the VAE just trained, the ControlNet stage starts from the UNet just trained.
  Learning curves (training loss; VAE validation PSNR) go to ``curves_<stage>.json``.
* ``export``: the final checkpoints as the official layouts (raw VAE state dict; ``{unet_state_dict,
  scale_factor}``; ``{controlnet_state_dict}``) into ``--dest`` (``bundles/maisi_ct/models/demo``), with their
  sha256.
* ``evaluate``: through the bundle's configs plus ``demo.json`` only: ``evaluate.json`` (VAE reconstruction PSNR of
  the held-out original CT and its reframings, HU clipped to [-1000, 1000]); ``inference.json`` generating CTs from
  the held-out CT's own TotalSegmentator label map (``--label_format totalsegmentator``), then the mean HU of
  liver, spleen, kidney and bone in each generated CT (inside its written label) against the real CT (inside the
  same MAISI ids of its own label map). Writes ``results.json`` and ``results.md``.
* ``reference-codes``: what simple codes of the VAE's size reach on the held-out CT, for scale on the VAE's PSNR
  bar (HU clipped to [-1000, 1000]): trilinear down- and upsampling by 2, 3 and 4 per axis, and a linear code of
  the same size as the VAE latent (4 numbers per 4x4x4 block: the block PCA of the training CTs, 1, 4, 8 and 16
  components). A learned VAE with 4 latent channels at 1/4 resolution should beat the 4-component PCA.

Usage::

    python -m common.data.demo --what ct ct_framings --n-train 24 --n-val 2 --seed 0 --out DATA
    python benchmarks/maisi_ct_demo.py train --data DATA --out RUN --budget-s 5100
    python benchmarks/maisi_ct_demo.py export --run RUN --dest bundles/maisi_ct/models/demo
    python benchmarks/maisi_ct_demo.py evaluate --data DATA --out RUN/eval --curves RUN
    python benchmarks/maisi_ct_demo.py reference-codes --data DATA
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "maisi_ct"
for _p in (str(REPO), str(BUNDLE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.demo_training import bundle_workflow, train_stage  # noqa: E402
from benchmarks.demo_training import parse_overrides as _overrides  # noqa: E402

STAGES = {"autoencoder": "train_autoencoder.json", "diffusion": "train_diffusion.json", "controlnet": "train_controlnet.json"}
CHECKPOINTS = {"autoencoder": "autoencoder_checkpoint.pt", "diffusion": "diffusion_unet_checkpoint.pt",
               "controlnet": "controlnet_checkpoint.pt"}
SHIPPED = {"autoencoder": "autoencoder.pt", "diffusion": "diffusion_unet.pt", "controlnet": "controlnet.pt"}
#: Organs of the HU bar: merged demo classes (common.data.demo.CT_CLASS_MERGE) whose TotalSegmentator members are
#: mapped to MAISI ids by name.
HU_ORGANS = {"liver": 1, "spleen": 2, "kidney": 3, "bone": 6}


def _workflow(files, wtype, **overrides):
    return bundle_workflow(BUNDLE, files, wtype, **overrides)


def cmd_train(args) -> None:
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    shares = dict(zip(STAGES, (float(s) for s in args.shares.split(","))))
    models = out / "models"
    chain = {  # each stage reads what the previous one wrote, not the shipped files of the overlay
        "autoencoder": {},
        "diffusion": {"autoencoder_path": str(models / CHECKPOINTS["autoencoder"]), "autoencoder_sha256": None},
        "controlnet": {"autoencoder_path": str(models / CHECKPOINTS["autoencoder"]), "autoencoder_sha256": None,
                       "diffusion_unet_path": str(models / CHECKPOINTS["diffusion"]), "diffusion_unet_sha256": None},
    }
    stages = list(STAGES) if args.stages is None else args.stages.split(",")
    overrides = _overrides(args.set)  # one parse, before any stage trains
    for stage in stages:
        extra = dict(chain[stage])
        if args.epoch_length is not None:
            extra["epoch_length"] = args.epoch_length
        extra.update(overrides)
        c = train_stage(BUNDLE, [STAGES[stage], "demo.json"], stage, out,
                        args.budget_s * shares[stage] / sum(shares.values()), prepare_first=stage != "autoencoder",
                        dataset_dir=str(data / "ct"), latent_dir=str(out / "latents"), **extra)
        print(f"[{stage}] done: {c['iterations']} iterations, {c['wall_s']:.0f} s, best val PSNR {c['best_val_psnr']}",
              flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_export(args) -> None:
    """The trainer checkpoints as the official file layouts (weights only, loadable with ``weights_only=True``)."""
    from common.networks.maisi import load_maisi_checkpoint
    from common.utils.io import atomic_write

    models, dest = Path(args.run) / "models", Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    digests = {}
    for stage, kind, key in (("autoencoder", "autoencoder", None), ("diffusion", "unet", "unet_state_dict"),
                             ("controlnet", "controlnet", "controlnet_state_dict")):
        state, scale = load_maisi_checkpoint(models / CHECKPOINTS[stage], kind)
        state = {k: v.detach().clone().contiguous() for k, v in state.items()}
        obj = state if key is None else {key: state}
        if stage == "diffusion":
            obj["scale_factor"] = scale
        target = dest / SHIPPED[stage]
        with atomic_write(target, "wb") as fh:
            torch.save(obj, fh)
        digests[{"diffusion": "diffusion_unet", "autoencoder": "autoencoder", "controlnet": "controlnet"}[stage]
                + "_sha256"] = _sha256(target)
        print(f"{target}: {target.stat().st_size / 2**20:.2f} MiB", flush=True)
    print(json.dumps(digests, indent=4))


def organ_mean_hu(image: np.ndarray, maisi_label: np.ndarray, groups: dict[str, list[int]]) -> dict[str, float | None]:
    """Mean HU inside each group of MAISI ids (``None`` where the group has no voxel)."""
    out = {}
    for name, ids in groups.items():
        mask = np.isin(maisi_label, ids)
        out[name] = float(image[mask].mean()) if mask.any() else None
    return out


def hu_groups() -> dict[str, list[int]]:
    """MAISI ids of each organ of :data:`HU_ORGANS`, through the name mapping the bundle uses for training labels."""
    from common.data.demo import CT_CLASS_MERGE, total_class_names
    from common.transforms.maisi import totalsegmentator_to_maisi_lut

    lut = totalsegmentator_to_maisi_lut(total_class_names())
    return {name: sorted({int(lut[t]) for t in CT_CLASS_MERGE[merged] if t < len(lut)} - {0})
            for name, merged in HU_ORGANS.items()}


def cmd_evaluate(args) -> None:
    import nibabel as nib

    from common.transforms.maisi import to_maisi_label, totalsegmentator_to_maisi_lut

    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    models = {} if args.models is None else {
        "autoencoder_path": str(Path(args.models) / SHIPPED["autoencoder"]),
        "diffusion_unet_path": str(Path(args.models) / SHIPPED["diffusion"]),
        "controlnet_path": str(Path(args.models) / SHIPPED["controlnet"]),
        "autoencoder_sha256": None, "diffusion_unet_sha256": None, "controlnet_sha256": None,
    }
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "command": "python benchmarks/maisi_ct_demo.py " + " ".join(sys.argv[1:])}

    # 1. VAE reconstruction: the original CT (datalist_total.json 'test') and its reframings
    recon = {}
    for name, datalist in (("original", data / "ct" / "datalist_total.json"),
                           ("framings", data / "ct_framings" / "datalist.json")):
        if not datalist.is_file() or args.skip_reconstruction:
            continue
        t = time.perf_counter()
        wf = _workflow(["evaluate.json", "demo.json"], "eval", datalist=str(datalist), output_dir=str(out / f"recon_{name}"),
                       overwrite=True, **{k: v for k, v in models.items() if k.startswith("autoencoder")})
        wf.run()
        wf.finalize()
        import csv

        with open(out / f"recon_{name}" / "reconstruction_metrics.csv") as fh:
            for row in csv.DictReader(fh):
                recon[row.get("id") or row.get("case") or next(iter(row.values()))] = row
        print(f"reconstruction {name}: {time.perf_counter() - t:.0f} s", flush=True)
    results["reconstruction"] = recon

    # 2. generation from the held-out CT's own label map
    datalist = json.loads((data / "ct" / "datalist_total.json").read_text())
    test = datalist["test"][0]
    ct_path, label_path = data / "ct" / test["image"], data / "ct" / test["label_total"]
    t = time.perf_counter()
    gen_dir = out / "generated"
    wf = _workflow(["inference.json", "demo.json"], "infer", label_path=str(label_path), label_format="totalsegmentator",
                   output_dir=str(gen_dir), num_output_samples=args.samples, overwrite=True, progress=False, **models)
    wf.run()
    wf.finalize()
    results["generation_wall_s"] = time.perf_counter() - t
    groups = hu_groups()
    ct = np.asarray(nib.load(str(ct_path)).dataobj, dtype=np.float32)
    lut = totalsegmentator_to_maisi_lut({int(k): v for k, v in datalist["labels"].items()})
    real_label = to_maisi_label(np.asarray(nib.load(str(label_path)).dataobj), lut, ct)
    real = organ_mean_hu(ct, real_label, groups)
    samples = []
    for img_file in sorted(gen_dir.glob("*_image.nii.gz")):
        lab_file = img_file.with_name(img_file.name.replace("_image.nii.gz", "_label.nii.gz"))
        gen = np.asarray(nib.load(str(img_file)).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(str(lab_file)).dataobj)
        hu = organ_mean_hu(gen, lab, groups)
        samples.append({"file": img_file.name, "mean_hu": hu,
                        "difference": {k: (None if hu[k] is None or real[k] is None else hu[k] - real[k]) for k in hu}})
    results["hu"] = {"groups": groups, "real": real, "samples": samples}
    if args.curves:
        curves = {p.stem.replace("curves_", ""): json.loads(p.read_text()) for p in sorted(Path(args.curves).glob("curves_*.json"))}
        results["curves"] = {k: {kk: v[kk] for kk in ("wall_s", "iterations", "best_val_psnr")} for k, v in curves.items()}
        learning_curves(curves, out / "learning_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def learning_curves(curves: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(4 * (len(curves) + 1), 3.2), squeeze=False)
    for i, (name, c) in enumerate(curves.items()):
        ax = axes[0, i]
        ax.plot(c["iteration"], c["loss"], lw=0.6)
        ax.set_yscale("log")
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel(f"iteration ({c['wall_s'] / 60:.0f} min)")
    vae = curves.get("autoencoder")
    if vae and vae["val_psnr"]:
        axes[0, -1].plot(vae["val_iteration"], vae["val_psnr"], "o-", ms=3)
    axes[0, -1].set_title("autoencoder: validation PSNR (dB)")
    axes[0, -1].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def markdown(results: dict) -> str:
    lines = [f"{results['date']}, {results['machine']}; command: `{results['command']}`", "",
             "| case | VAE PSNR (dB) | SSIM |", "|---|---|---|"]
    for case, row in results["reconstruction"].items():
        psnr = next((v for k, v in row.items() if "psnr" in k.lower()), "")
        ssim = next((v for k, v in row.items() if "ssim" in k.lower()), "")
        lines.append(f"| {case} | {float(psnr):.2f} | {float(ssim):.4f} |" if psnr else f"| {case} | {row} | |")
    hu = results["hu"]
    organs = list(hu["real"])
    lines += ["", f"Generation from the held-out CT's label map: {results['generation_wall_s']:.0f} s", "",
              "| image | " + " | ".join(f"{o} mean HU" for o in organs) + " |", "|---" * (len(organs) + 1) + "|",
              "| real CT | " + " | ".join(f"{hu['real'][o]:.0f}" for o in organs) + " |"]
    for s in hu["samples"]:
        cells = [("n/a" if s["mean_hu"][o] is None else f"{s['mean_hu'][o]:.0f} ({s['difference'][o]:+.0f})") for o in organs]
        lines.append(f"| {s['file']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _clipped_unit(path: Path) -> np.ndarray:
    """A CT volume in HU as MAISI's VAE sees it: clipped to [-1000, 1000], scaled to [0, 1]."""
    import nibabel as nib

    x = np.clip(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), -1000, 1000)
    return (x + 1000) / 2000


def _blocks(x: np.ndarray, b: int = 4) -> np.ndarray:
    s = [(n // b) * b for n in x.shape]
    x = x[: s[0], : s[1], : s[2]]
    return x.reshape(s[0] // b, b, s[1] // b, b, s[2] // b, b).transpose(0, 2, 4, 1, 3, 5).reshape(-1, b**3)


def cmd_reference_codes(args) -> dict:
    import torch.nn.functional as F

    ct = Path(args.data) / "ct"
    datalist = json.loads((ct / "datalist_total.json").read_text())
    test = _clipped_unit(ct / datalist["test"][0]["image"])
    psnr = lambda mse: float(10 * np.log10(1.0 / mse))  # noqa: E731  (data range 1)
    out: dict = {"trilinear": {}, "block_pca": {}}
    x = torch.from_numpy(test)[None, None]
    for f in (2, 3, 4):
        down = F.interpolate(x, scale_factor=1 / f, mode="trilinear", align_corners=False)
        up = F.interpolate(down, size=x.shape[2:], mode="trilinear", align_corners=False)
        out["trilinear"][f"1/{f}"] = psnr(float(((up - x) ** 2).mean()))
    train = np.concatenate([_blocks(_clipped_unit(ct / e["image"])) for e in datalist["training"]])
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    blocks = _blocks(test)
    for k in (1, 4, 8, 16):
        rec = (blocks - mean) @ vt[:k].T @ vt[:k] + mean
        out["block_pca"][str(k)] = psnr(float(((rec - blocks) ** 2).mean()))
    print(json.dumps(out, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("train")
    s.add_argument("--data", required=True, help="folder holding ct/ (python -m common.data.demo --what ct)")
    s.add_argument("--out", required=True)
    s.add_argument("--budget-s", type=float, default=5100.0)
    s.add_argument("--shares", default="50,20,30", help="budget shares of autoencoder, diffusion, controlnet")
    s.add_argument("--stages", default=None, help="comma-separated subset, e.g. diffusion,controlnet")
    s.add_argument("--epoch-length", type=int, default=None)
    s.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="config override for every stage run (repeatable), e.g. --set adv_weight=0")
    s = sub.add_parser("export")
    s.add_argument("--run", required=True)
    s.add_argument("--dest", default=str(BUNDLE / "models" / "demo"))
    s = sub.add_parser("evaluate")
    s.add_argument("--data", required=True, help="folder holding ct/ and ct_framings/")
    s.add_argument("--out", required=True)
    s.add_argument("--models", default=None, help="folder of exported weights (default: demo.json's models/demo)")
    s.add_argument("--samples", type=int, default=2)
    s.add_argument("--curves", default=None, help="training run folder with curves_*.json")
    s.add_argument("--skip-reconstruction", action="store_true", help="only the generation and its HU check")
    s = sub.add_parser("reference-codes")
    s.add_argument("--data", required=True, help="folder holding ct/")
    args = p.parse_args(argv)
    return {"train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate,
            "reference-codes": cmd_reference_codes}[args.cmd](args)


if __name__ == "__main__":
    main()
