#!/usr/bin/env python
"""Fixed-budget CPU benchmark of the ivan_fusion bundle on the demo cohort.

Synthesis (T1 -> T2 and T1 + PD -> T2): iVAN and a 2D UNet regression baseline are trained for the same
wall-clock budget on 2D axial slices of the simulated subjects (``common.data.demo.build_brain_mri_demo``) and
evaluated on the real SPM avg152 triple, next to a training-free baseline (the T1 histogram-matched to the
training T2 intensities). Metrics: paper-style per-slice PSNR (= the code's 255-scale PSNR), SSIM
(scikit-image defaults) and NMSE, 3D PSNR (volume and brain mask), 3D SSIM and NMSE; for iVAN also the
reverse-reconstruction error of the sources (from the forward output and from the real T2).

Fusion (T2 + CT): iVAN is trained for the budget towards the Laplacian max-abs reference on the semi-synthetic
avg152 T2 + CT-like pair and compared with the reference rule and simple averaging (AG, SF, EN, QMI, Q^AB/F,
Piella's Q). The fusion pair is also the test pair: the target is a rule of the inputs, so this measures how
well the network imitates the rule, not generalisation.

Usage::

    python benchmarks/ivan_fusion.py --out results/ivan_fusion --budget-s 200

Writes ``results.json`` and ``results.md`` into ``--out``. The network is reduced for CPU (``--num-blocks``,
``--growth``); the numbers are a budget comparison, not the paper-scale training of 300 epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ivan_fusion"


def _load_volumes(items: list[dict], keys: list[str], ct_keys=("ct",)) -> list[dict]:
    """The bundle's preprocessing: load, channel first, RAS, percentile of the non-zero voxels (MR) / HU window
    (CT) scaling."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
    )

    from common.transforms.intensity import ScaleNonzeroPercentiled

    mr = [k for k in keys if k not in ct_keys and k != "mask"]
    ct = [k for k in keys if k in ct_keys]
    t = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        EnsureTyped(keys, dtype=torch.float32),
        ScaleNonzeroPercentiled(mr, lower=0, upper=99.5),
    ]
    if ct:
        t.append(ScaleIntensityRanged(ct, a_min=-1000, a_max=2000, b_min=0.0, b_max=1.0, clip=True))
    tr = Compose(t)
    return [tr(dict(it)) for it in items]


def _slices(vols: list[dict], inputs: list[str], target_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-empty axial slices: X (N, n_in, H, W), Y (N, n_out, H, W)."""
    xs, ys = [], []
    for v in vols:
        x = torch.cat([torch.as_tensor(v[k]) for k in inputs])  # (n_in, H, W, D)
        y = target_fn(v)
        idx = torch.nonzero(x.amax(dim=(0, 1, 2)) > 0).flatten()  # skip all-zero slices
        xs.append(x[..., idx].permute(3, 0, 1, 2))
        ys.append(y[..., idx].permute(3, 0, 1, 2))
    return torch.cat(xs).float(), torch.cat(ys).float()


def _train(model_step, n: int, budget_s: float, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t0, it, losses = time.time(), 0, []
    while time.time() - t0 < budget_s:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch + 1, batch):
            if time.time() - t0 >= budget_s:
                break
            losses.append(model_step(perm[start : start + batch]))
            it += 1
    return {"iterations": it, "seconds": time.time() - t0, "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}


def _synthesis_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> dict:
    from common.metrics.image import nmse, psnr, psnr_per_slice, ssim3d, ssim_per_slice

    pred, target = np.clip(pred, 0, 1), np.clip(target, 0, 1)
    ps, ss = psnr_per_slice(pred, target, axis=-1), ssim_per_slice(pred, target, axis=-1)
    nm = [nmse(pred[..., i], target[..., i]) for i in ps.indices]
    out = {
        "psnr_slice": float(np.mean(ps.values[np.isfinite(ps.values)])), "ssim_slice": ss.mean,
        "nmse_slice": float(np.mean(nm)), "slices": int(ps.count),
        "psnr3d": psnr(pred, target), "ssim3d": ssim3d(pred, target), "nmse3d": nmse(pred, target),
    }
    if mask is not None:
        out["psnr3d_mask"] = psnr(pred, target, mask=mask > 0)
    return out


def _volume_infer(fn, x: torch.Tensor, sw: int = 8) -> torch.Tensor:
    """(C, H, W, D) -> (C', H, W, D) slice by slice with SliceInferer (whole slices)."""
    from monai.inferers import SliceInferer

    inf = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=sw, progress=False)
    with torch.no_grad():
        return inf(x[None], fn)[0]


class _Fn(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def synthesis(task: str, inputs: list[str], vols_tr, vol_te, args, log) -> dict:
    from monai.networks.nets import UNet
    from skimage.exposure import match_histograms

    from common.engines.ivan_step import ivan_losses
    from common.networks.ivan import IVAN, IVANPredictor
    from common.transforms.ivan import augment_sources, augmented_channels

    n_in, n_out = len(inputs), 1
    C = augmented_channels(n_in, n_out)
    X, Y = _slices(vols_tr, inputs, lambda v: torch.as_tensor(v["t2"]))
    log(f"[{task}] {X.shape[0]} training slices {tuple(X.shape[2:])}")
    Xa, Ya = augment_sources(X, C, dim=1), augment_sources(Y, C, dim=1)
    res = {"task": task, "inputs": inputs, "train_slices": int(X.shape[0])}

    torch.manual_seed(args.seed)
    net = IVAN(C, num_blocks=args.num_blocks, growth=args.growth, seed=args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def ivan_step(idx):
        opt.zero_grad()
        loss = ivan_losses(net, Xa[idx], Ya[idx], n_out=1)["loss"]
        loss.backward()
        opt.step()
        return loss.item()

    res["ivan_train"] = _train(ivan_step, Xa.shape[0], args.budget_s, args.batch, args.seed)
    log(f"[{task}] iVAN trained {res['ivan_train']}")

    torch.manual_seed(args.seed)
    unet = UNet(2, n_in, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    opt_u = torch.optim.Adam(unet.parameters(), lr=args.lr)
    pad = (0, (-X.shape[-1]) % 8, 0, (-X.shape[-2]) % 8)

    def unet_fn(x):
        h, w = x.shape[-2:]
        return torch.clamp(unet(F.pad(x, pad))[..., :h, :w], 0, 1)

    def unet_step(idx):
        opt_u.zero_grad()
        loss = F.mse_loss(unet_fn(X[idx]), Y[idx])
        loss.backward()
        opt_u.step()
        return loss.item()

    res["unet_train"] = _train(unet_step, X.shape[0], args.budget_s, args.batch, args.seed)
    log(f"[{task}] UNet trained {res['unet_train']}")

    net.eval(), unet.eval()
    x_te = torch.cat([torch.as_tensor(vol_te[k]) for k in inputs]).float()
    y_te = torch.as_tensor(vol_te["t2"])[0].numpy()
    mask = torch.as_tensor(vol_te["mask"])[0].numpy() if "mask" in vol_te else None
    t0 = time.time()
    both = _volume_infer(IVANPredictor(net, n_in, 1, direction="both"), augment_sources(x_te, C)).numpy()
    res["ivan_infer_s"] = time.time() - t0
    rev_from_t2 = _volume_infer(
        IVANPredictor(net, n_in, 1, direction="reverse"), augment_sources(torch.as_tensor(vol_te["t2"]).float(), C)
    ).numpy()
    pred_unet = _volume_infer(_Fn(unet_fn), x_te).numpy()[0]
    t1 = torch.as_tensor(vol_te["t1"])[0].numpy()
    train_t2 = np.concatenate([torch.as_tensor(v["t2"]).numpy().ravel() for v in vols_tr])
    train_t2 = train_t2[train_t2 > 0]
    hist = np.zeros_like(t1)
    fg = t1 > 0
    hist[fg] = match_histograms(t1[fg], train_t2)

    res["metrics"] = {
        "ivan": _synthesis_metrics(both[0], y_te, mask),
        "unet2d": _synthesis_metrics(pred_unet, y_te, mask),
        "histogram_matched_t1": _synthesis_metrics(hist, y_te, mask),
    }
    for j, m in enumerate(inputs):
        src = torch.as_tensor(vol_te[m])[0].numpy()
        res["metrics"][f"ivan_rev_{m}_from_output"] = _synthesis_metrics(both[1 + j], src, mask)
        res["metrics"][f"ivan_rev_{m}_from_t2"] = _synthesis_metrics(rev_from_t2[j], src, mask)
    with torch.no_grad():  # invertibility of the trained network on the real test slices (unclamped)
        xa = augment_sources(x_te, C).permute(3, 0, 1, 2)[40:50]
        res["ivan_inverse_max_abs_err"] = float((net.inverse(net(xa)) - xa).abs().max())
    log(f"[{task}] metrics {json.dumps(res['metrics'], default=float)[:400]}")
    return res


def fusion(fus_json: Path, args, log) -> dict:
    from common.engines.ivan_step import ivan_losses
    from common.metrics.fusion import fusion_metrics
    from common.networks.ivan import IVAN, IVANPredictor
    from common.transforms.ivan import average_fusion, laplacian_maxabs_fusion

    d = json.loads(fus_json.read_text())
    item = {k: str(fus_json.parent / v) for k, v in d["training"][0].items() if k != "id"}
    vol = _load_volumes([item], ["t2", "ct"])[0]
    a, b = torch.as_tensor(vol["t2"]).float(), torch.as_tensor(vol["ct"]).float()  # (1, H, W, D)
    src = torch.stack([a[0], b[0]]).permute(0, 3, 1, 2)  # (2, D, H, W)
    ref = laplacian_maxabs_fusion(src, 4)  # (D, H, W)
    keep = torch.nonzero(src.amax(dim=(0, 2, 3)) > 0).flatten()
    X = src[:, keep].permute(1, 0, 2, 3).contiguous()
    Y = ref[keep][:, None].expand(-1, 2, -1, -1).contiguous()
    torch.manual_seed(args.seed)
    net = IVAN(2, num_blocks=args.num_blocks, growth=args.growth, seed=args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def step(idx):
        opt.zero_grad()
        loss = ivan_losses(net, X[idx], Y[idx], n_out=1)["loss"]
        loss.backward()
        opt.step()
        return loss.item()

    res = {"train": _train(step, X.shape[0], args.budget_s, args.batch, args.seed), "slices": int(X.shape[0])}
    log(f"[fusion] trained {res['train']}")
    net.eval()
    out = _volume_infer(IVANPredictor(net, 2, 1, direction="forward"), torch.cat([a, b])).numpy()[0]
    fused = {
        "ivan": np.moveaxis(out, -1, 0), "reference_laplacian": ref.numpy(), "average": average_fusion(src).numpy()
    }
    A, B = src[0].numpy(), src[1].numpy()
    metrics = {}
    for name, f in fused.items():
        rows = [fusion_metrics(A[i], B[i], np.clip(f[i], 0, 1)) for i in keep.tolist()]
        metrics[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    res["metrics"] = metrics
    diff = fused["ivan"][keep.numpy()] - fused["reference_laplacian"][keep.numpy()]
    res["ivan_vs_reference_psnr"] = float(10 * np.log10(1.0 / np.mean(diff**2)))
    log(f"[fusion] {json.dumps(metrics)}")
    return res


def _markdown(results: dict) -> str:
    lines = [f"Budget {results['args']['budget_s']} s per model, iVAN {results['args']['num_blocks']} blocks / growth "
             f"{results['args']['growth']}, lr {results['args']['lr']}, batch {results['args']['batch']}, "
             f"{results['torch_threads']} CPU thread(s).", ""]
    for task in ("1to1", "2to1"):
        if task not in results:
            continue
        r = results[task]
        lines += [f"### {task} ({' + '.join(r['inputs'])} -> t2), test: real avg152, {r['metrics']['ivan']['slices']} slices", "",
                  "| method | iters | PSNR slice | SSIM slice | NMSE slice | PSNR 3D | PSNR 3D mask | SSIM 3D | NMSE 3D |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            iters = r["ivan_train"]["iterations"] if name.startswith("ivan") else r["unet_train"]["iterations"] if name == "unet2d" else 0
            lines.append(f"| {name} | {iters} | {m['psnr_slice']:.2f} | {m['ssim_slice']:.4f} | {m['nmse_slice']:.4f} | "
                         f"{m['psnr3d']:.2f} | {m.get('psnr3d_mask', float('nan')):.2f} | {m['ssim3d']:.4f} | {m['nmse3d']:.4f} |")
        lines += ["", f"max |f^-1(f(x)) - x| of the trained iVAN on real test slices: {r['ivan_inverse_max_abs_err']:.2e}", ""]
    if "fusion" in results:
        r = results["fusion"]
        lines += [f"### fusion (T2 + CT-like, {r['slices']} slices; iVAN {r['train']['iterations']} iterations)", "",
                  "| method | AG | SF | EN | QMI | Q^AB/F | Piella Q |", "|---|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            lines.append(f"| {name} | {m['ag']:.3f} | {m['sf']:.3f} | {m['en']:.3f} | {m['qmi']:.4f} | {m['qabf']:.4f} | {m['piella_q']:.4f} |")
        lines += ["", f"iVAN vs reference PSNR: {r['ivan_vs_reference_psnr']:.2f} dB", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/ivan_fusion")
    p.add_argument("--data-dir", default=None, help="where the demo cohorts are built (default: <out>/data)")
    p.add_argument("--budget-s", type=float, default=200.0, help="training seconds per model")
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--growth", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="1to1,2to1,fusion")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    sys.path.insert(0, str(REPO))
    from common.data.demo import build_brain_mri_demo
    from common.data.fetch import demo_file

    tasks = args.tasks.split(",")
    results = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    if {"1to1", "2to1"} & set(tasks):
        dl = build_brain_mri_demo(data_dir, n_train=args.n_train, n_val=0 if args.n_train else 2, seed=args.seed)
        d = json.loads(Path(dl).read_text())
        base = Path(dl).parent
        keys = ["t1", "t2", "pd", "mask"]
        tr = [{k: str(base / it[k]) for k in keys if k in it} for it in d["training"]]
        te = {k: str(base / d["test"][0][k]) for k in keys if k in d["test"][0]}
        vols_tr = _load_volumes(tr, [k for k in keys if k in tr[0]])
        vol_te = _load_volumes([te], [k for k in keys if k in te])[0]
        log(f"loaded {len(vols_tr)} training subjects and the avg152 test case")
        for task, inputs in (("1to1", ["t1"]), ("2to1", ["t1", "pd"])):
            if task in tasks:
                results[task] = synthesis(task, inputs, vols_tr, vol_te, args, log)
    if "fusion" in tasks:
        from common.data.fusion_demo import build_fusion_demo

        fus_json = build_fusion_demo(data_dir, demo_file("spm/avg152T2.nii"), demo_file("spm/TPM.nii"))
        results["fusion"] = fusion(fus_json, args, log)
    results["total_s"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
