"""noddi_sr: cost of stage-3 validation (DDIM sampling over sliding windows) against the training it interrupts.

Counts the LR windows the bundle's inferer (``NODDISRInferer``, 32³ windows, overlap 0.4375) sends per validation volume,
whole and with the ``val_roi`` centre crop of ``train_diffusion.json``, and measures the CPU time (one thread,
``time.process_time``, so a busy machine does not inflate it) of one UNet evaluation on one window and of one training
step (batch 2, forward + backward + Adam) of the paper-scale ``DiffusionModelUNet`` at a chosen latent size. From them:
the time of one validation (n_val volumes x windows x DDIM steps UNet evaluations) relative to the ``epoch_length``
training steps between two validations.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/noddi_sr_validation_cost.py --out runs/noddi_val_cost --latent 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "noddi_sr"


def count_windows(lr_shape, roi, lr_patch, overlap) -> int:
    from common.engines.noddi_steps import NODDISRInferer
    from common.transforms.dwi import ScaledPairCenterCropd

    x = ScaledPairCenterCropd("image", [], roi)({"image": torch.zeros(1, *lr_shape)})["image"]
    return NODDISRInferer(roi_size=lr_patch, overlap=overlap, sampler=None).count_windows(x.shape[1:])


def unet_times(parser, latent: int, repeats: int) -> dict:
    unet = parser.get_parsed_content("unet_def")
    c = parser["embed_dim"]
    n_params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(1, 2 * c, latent, latent, latent)
    t = torch.tensor([500])
    with torch.no_grad():
        unet.eval()
        unet(x, t)  # warm-up
        t0 = time.process_time()
        for _ in range(repeats):
            unet(x, t)
        fwd = (time.process_time() - t0) / repeats
    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    xb, tb, target = torch.randn(2, 2 * c, latent, latent, latent), torch.tensor([100, 900]), torch.randn(2, c, latent, latent, latent)
    t0 = time.process_time()
    for _ in range(repeats):
        loss = torch.nn.functional.l1_loss(unet(xb, tb), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = (time.process_time() - t0) / repeats
    return {"latent": latent, "unet_parameters": n_params, "forward_one_window_s": fwd, "train_step_batch2_s": step}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--latent", type=int, default=32, help="latent size of the timed UNet (32 = the 64³ HR patch)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--n_val", type=int, default=3, help="validation subjects (CLDM: 3)")
    ap.add_argument("--no_time", action="store_true", help="count windows only")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(BUNDLE / "configs" / "train_diffusion.json"))
    lr_patch, overlap, roi = p.get_parsed_content("lr_patch"), p["val_overlap"], p["val_roi"]
    res = {"command": "python benchmarks/noddi_sr_validation_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "val_roi": roi, "val_ddim_steps": p["val_ddim_steps"], "epoch_length": p["epoch_length"], "volumes": {}}
    for name, shape in (("hcp_136x172x136", (68, 86, 68)), ("phantom_2mm_spm", (45, 54, 45))):
        res["volumes"][name] = {"lr_shape": shape, "windows_whole": count_windows(shape, None, lr_patch, overlap),
                                "windows_val_roi": count_windows(shape, roi, lr_patch, overlap)}
    if not args.no_time:
        res["timing"] = unet_times(p, args.latent, args.repeats)
        tm = res["timing"]
        train = p["epoch_length"] * tm["train_step_batch2_s"]
        for name, v in res["volumes"].items():
            for label, win, steps in (("spec_ddim100_whole", v["windows_whole"], 100), ("default", v["windows_val_roi"], p["val_ddim_steps"])):
                cost = args.n_val * win * steps * tm["forward_one_window_s"]
                v[label] = {"unet_evaluations": args.n_val * win * steps, "validation_s": cost, "relative_to_training": cost / train}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
