"""noddi_sr benchmark on the semi-synthetic phantom: the diffusion model against two baselines, measured in one run.

Methods, evaluated identically on held-out phantoms (bundle ``scripts/evaluation.py``: PSNR / 3D SSIM / MAE per map in
brain, WM and GM, plus the CLDM-compatible flattened metrics):

- ``noddi_sr`` (ours): the bundle's three stages trained here (configs + ``tiny.json`` sizes, the given iteration
  budget per stage), DDIM with 100 / 50 / 25 steps (eta 0): time and accuracy per step count;
- ``noddi_sr_encoder``: the deterministic stage-2 path decode(quantise(Enc(f))) (no diffusion);
- B2 ``unet``: MONAI ``BasicUNet(3, C_feat, 3)`` (GroupNorm 8) on the features upsampled ×2 (trilinear), sigmoid, L1 to the HR maps,
  Adam 1e-4, the same patches, and the same budget (the iterations of all three stages together);
- B1 ``amico_lr_up``: AMICO NODDI fitted on the trilinearly upsampled LR DWI (needs ``dmri-amico``);
- B0 ``amico_hr_clean``: AMICO on the noise-free HR DWI (the fitting floor; needs ``dmri-amico``).

It also records AMICO's NODDI synthesis against :mod:`common.data.noddi` (max |difference|).

Usage (CPU, a few minutes at the defaults; numbers go to ``<out>/results.md`` and ``results.json``)::

    OMP_NUM_THREADS=2 python benchmarks/noddi_sr.py --out runs/noddi_bench --iters 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "noddi_sr"


def _workflow(files, wtype, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in files] + [str(BUNDLE / "configs" / "tiny.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type=wtype,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    return wf


def _train_stage(cfg, data_dir, ckpt_dir, out_dir, iters, lr):
    t0 = time.perf_counter()
    wf = _workflow(
        [cfg], "train", dataset_dir=str(data_dir), ckpt_dir=str(ckpt_dir), output_dir=str(out_dir),
        epoch_length=int(iters), max_epochs=1, val_interval=1, learning_rate=lr,
        overwrite=True,  # a benchmark re-run retrains from scratch into the same folder
    )
    wf.run()
    wf.finalize()
    return wf, time.perf_counter() - t0


def _load_case(entry, base):
    """Features (1, C, x, y, z) MetaTensor, reference maps (3, X, Y, Z) and masks, through the inference preprocessing."""
    from monai.transforms import LoadImaged

    d = {k: (str(base / v) if isinstance(v, str) and (base / v).exists() else v) for k, v in entry.items()}
    maps = LoadImaged(["noddi", "mask_hr", "wm", "gm"], ensure_channel_first=True, image_only=True)(d)
    return d, maps


def _upsample_dwi(dwi_path: Path, out_path: Path) -> Path:
    """Trilinear ×2 of a 4D DWI onto the HR grid of the bundle (the B1 input)."""
    from scipy import ndimage

    from common.data.noddi_phantom import hr_affine

    img = nib.load(dwi_path)
    lr = np.asarray(img.dataobj, dtype=np.float32)
    shape = [2 * s for s in lr.shape[:3]]
    coords = np.meshgrid(*[(np.arange(s) + 0.5) / 2 - 0.5 for s in shape], indexing="ij")
    hr = np.stack([ndimage.map_coordinates(lr[..., v], coords, order=1, mode="nearest") for v in range(lr.shape[3])], -1)
    nib.save(nib.Nifti1Image(hr.astype(np.float32), hr_affine(img.affine)), out_path)
    return out_path


def b2_unet(n_feat: int) -> torch.nn.Module:
    """B2: MONAI ``BasicUNet(3, n_feat, 3)`` with GroupNorm 8 (BasicUNet's InstanceNorm fails on small patches:
    a 16^3 patch reaches 1^3 at the bottleneck)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=n_feat, out_channels=3, norm=("group", {"num_groups": 8}))


def b2_train_step(unet: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    """One B2 step: LR features upsampled x2 (trilinear), sigmoid, L1 to the HR maps; returns the loss."""
    f = torch.nn.functional.interpolate(batch["image"].float(), scale_factor=2, mode="trilinear", align_corners=False)
    loss = torch.nn.functional.l1_loss(torch.sigmoid(unet(f)), batch["label"].float())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def b2_predict(unet: torch.nn.Module, feats: torch.Tensor, roi_lr, overlap: float, sw_batch_size: int = 4) -> torch.Tensor:
    """B2 maps of LR features (1, C, x, y, z): sliding window on the x2 grid with HR windows of 2 x ``roi_lr``."""
    from monai.inferers import sliding_window_inference

    up = torch.nn.functional.interpolate(feats.float(), scale_factor=2, mode="trilinear", align_corners=False)
    return torch.sigmoid(sliding_window_inference(up, [2 * r for r in roi_lr], sw_batch_size, unet, overlap=overlap, mode="constant"))


def _amico_maps(dwi, bval, bvec, mask, out_dir) -> np.ndarray:
    sys.path.insert(0, str(BUNDLE))
    from scripts.fit_noddi_amico import fit_noddi

    paths = fit_noddi(str(dwi), str(bval), str(bvec), str(mask), str(out_dir))
    return np.stack([np.clip(np.nan_to_num(nib.load(p).get_fdata()), 0, 1) for p in paths])


def _amico_synthesis_check() -> float:
    from common.utils.amico import import_amico

    amico = import_amico("scheme", "synthesis")  # keeps logging's logger class (dicelib's exits on error)
    Scheme, NODDIExtraCellular, NODDIIntraCellular = amico.scheme.Scheme, amico.synthesis.NODDIExtraCellular, amico.synthesis.NODDIIntraCellular
    from common.data.noddi import extra_neurite_signal, intra_neurite_signal, odi_to_kappa
    from common.data.noddi_phantom import acquisition_scheme

    b, g = acquisition_scheme("default")
    sch = Scheme(np.c_[g, b], b0_thr=50)
    worst = 0.0
    for odi in (0.02, 0.05, 0.15, 0.4, 0.7, 0.95):
        k = float(odi_to_kappa(odi))
        ours = np.array([intra_neurite_signal(bb, k, gg[2]) if bb > 0 else 1.0 for bb, gg in zip(b, g)])
        worst = max(worst, float(np.abs(NODDIIntraCellular(sch).get_signal(1.7e-3, k) - ours).max()))
        ours_ec = extra_neurite_signal(b, k, g[:, 2], 0.6)
        worst = max(worst, float(np.abs(NODDIExtraCellular(sch).get_signal(1.7e-3, k, 0.6) - ours_ec).max()))
    return worst


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=200, help="training iterations per stage (B2 gets 3x)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n_train", type=int, default=4)
    ap.add_argument("--n_test", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 50, 25])
    ap.add_argument("--no_amico", action="store_true")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(BUNDLE))
    from common.data.noddi_phantom import PhantomConfig, build_phantom_cohort
    from scripts.evaluation import case_metrics

    torch.manual_seed(args.seed)
    out = Path(args.out)
    data, ckpt = out / "data", out / "models"
    results: dict = {"command": "python benchmarks/noddi_sr.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.perf_counter()
    cfg = PhantomConfig(hr_spacing=5.0, hr_shape=(32, 32, 32), scheme="dipy_small_101D", snr=30.0, write_hr_dwi=True)
    dl_path = build_phantom_cohort(data, n_train=args.n_train, n_val=1, n_test=args.n_test, seed=args.seed, cfg=cfg)
    results["phantom_s"] = time.perf_counter() - t0
    datalist = json.loads(dl_path.read_text())

    timings = {}
    _, timings["vqgan"] = _train_stage("train_vqgan.json", data, ckpt, out / "out_vqgan", args.iters, args.lr)
    enc_wf, timings["cond_encoder"] = _train_stage("train_cond_encoder.json", data, ckpt, out / "out_enc", args.iters, args.lr)
    _, timings["diffusion"] = _train_stage("train_diffusion.json", data, ckpt, out / "out_diff", args.iters, args.lr)
    results["train_s"] = timings

    # B2: direct regression UNet on the same patches, budget = all three stages' iterations
    loader = enc_wf.parser.get_parsed_content("train#dataloader")
    unet = b2_unet(2 * len(enc_wf.parser["shells"]))
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr)
    it, t_b2 = 0, time.perf_counter()
    unet.train()
    while it < 3 * args.iters:
        for batch in loader:
            b2_train_step(unet, opt, batch)
            it += 1
            if it >= 3 * args.iters:
                break
    timings["unet_baseline"] = time.perf_counter() - t_b2
    unet.eval()

    inf_wf = _workflow(
        ["inference.json"], "infer", dataset_dir=str(data), ckpt_dir=str(ckpt), output_dir=str(out / "pred"), progress=False, sw_batch_size=64
    )
    sys.path.insert(0, str(BUNDLE))
    from scripts import load_inference_weights

    net = inf_wf.parser.get_parsed_content("network")
    load_inference_weights(net, ckpt)
    net.eval()
    pre = inf_wf.parser.get_parsed_content("preprocessing")
    inferer = inf_wf.parser.get_parsed_content("inferer")
    sampler = inf_wf.parser.get_parsed_content("sampler")
    from common.engines.noddi_steps import NODDISRInferer
    from common.transforms.dwi import HRMapsd

    rows, ddim = [], {}
    for entry in datalist["test"]:
        d, ref = _load_case(entry, data)
        item = pre({k: d[k] for k in ("id", "dwi", "bval", "bvec", "mask")})
        feats = item["image"][None].float()
        masks = {"brain": ref["mask_hr"][0].numpy() > 0, "wm": ref["wm"][0].numpy() > 0, "gm": ref["gm"][0].numpy() > 0}
        truth = ref["noddi"].numpy().astype(np.float64)
        hr_mask = ref["mask_hr"][0].numpy() > 0

        def finish(pred):
            post = HRMapsd("pred", ref_key="image", mask_key=None, hr_mask_key="mask_hr")({"pred": pred[0], "image": item["image"], "mask_hr": ref["mask_hr"]})
            return post["pred"].numpy().astype(np.float64)

        for steps in args.steps:
            sampler.num_inference_steps = steps
            t = time.perf_counter()
            with torch.no_grad():
                pred = inferer(feats, net)
            ddim.setdefault(steps, []).append(time.perf_counter() - t)
            rows += case_metrics(finish(pred), truth, masks, entry["id"], f"noddi_sr_ddim{steps}")
        with torch.no_grad():
            pred = NODDISRInferer(roi_size=inferer.roi_size, sampler=None)(feats, net)
        rows += case_metrics(finish(pred), truth, masks, entry["id"], "noddi_sr_encoder")
        with torch.no_grad():
            pred = b2_predict(unet, feats, inferer.roi_size, overlap=0.4375, sw_batch_size=1)
        rows += case_metrics(finish(pred), truth, masks, entry["id"], "unet")
        if not args.no_amico:
            case_dir = out / "amico" / entry["id"]
            case_dir.mkdir(parents=True, exist_ok=True)
            up_dwi = _upsample_dwi(Path(d["dwi"]), case_dir / "dwi_up.nii.gz")
            maps = _amico_maps(up_dwi, d["bval"], d["bvec"], d["mask_hr"], case_dir / "lr_up") * hr_mask
            rows += case_metrics(maps, truth, masks, entry["id"], "amico_lr_up")
            maps = _amico_maps(d["dwi_hr"], d["bval"], d["bvec"], d["mask_hr"], case_dir / "hr_clean") * hr_mask
            rows += case_metrics(maps, truth, masks, entry["id"], "amico_hr_clean")
    results["ddim_s_per_case"] = {int(k): float(np.mean(v)) for k, v in ddim.items()}
    if not args.no_amico:
        results["amico_synthesis_max_abs_diff"] = _amico_synthesis_check()

    summary = {}
    for r in rows:
        if r["mask"] in ("brain", "wm", "gm") or r["map"] == "all":
            key = (r["method"], r["map"], r["mask"])
            summary.setdefault(key, []).append(r)
    table = []
    for (method, m, mask), rs in summary.items():
        table.append({"method": method, "map": m, "mask": mask, **{k: float(np.nanmean([x[k] for x in rs])) for k in ("psnr", "ssim", "mae")}})
    results["metrics"] = table
    results["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"command: `{results['command']}`", "", "| method | map | mask | PSNR | SSIM | MAE |", "|---|---|---|---|---|---|"]
    for r in table:
        if r["mask"] == "brain" or r["map"] == "all":
            lines.append(f"| {r['method']} | {r['map']} | {r['mask']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['mae']:.4f} |")
    lines += ["", f"training time (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}",
              f"DDIM time per case (s): {json.dumps({k: round(v, 2) for k, v in results['ddim_s_per_case'].items()})}"]
    if "amico_synthesis_max_abs_diff" in results:
        lines.append(f"AMICO synthesis vs common.data.noddi, max |diff|: {results['amico_synthesis_max_abs_diff']:.2e}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
