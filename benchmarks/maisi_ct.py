"""Time and peak memory of the full-size MAISI networks (random weights) on the CPU or a CUDA GPU.

Measures, each case in its own process so peak memory is per case:

* one rectified-flow sampling step (ControlNet + diffusion UNet, rflow v2 networks) at the latent of a
  128^3 and a 256x256x128 output,
* the VAE decode of that latent, whole-volume with and without tensor splitting (``num_splits`` 1 and 4),
  and by sliding window on the latent (ROI 48^3 latent voxels as officially, at most half the latent per
  axis so the windowed path is always taken),
* the projected sampling time of a 30-step rectified-flow sample and of a 1000-step DDPM sample
  (steps x measured step time + the fastest measured decode). The DDPM projection reuses the rflow step
  time: the DDPM UNet and ControlNet have 6 % and 5 % fewer parameters and the same resolution levels, so
  this slightly overestimates it.

Usage::

    python benchmarks/maisi_ct.py [--sizes 128,128,128 256,256,128] [--threads 2] [--out results.json]

CPU peak memory is the process's maximum resident set size; GPU peak memory is ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: str, size: list[int], device: torch.device) -> dict:
    from monai.networks.schedulers import RFlowScheduler

    from common.inferers.maisi import MaisiInferer
    from common.networks.maisi import maisi_autoencoder, maisi_controlnet, maisi_diffusion_unet
    from common.transforms.maisi import binarize_labels

    torch.manual_seed(0)
    latent_shape = (1, 4, *(s // 4 for s in size))
    z = torch.randn(latent_shape, device=device)
    amp = torch.autocast("cuda", enabled=device.type == "cuda")
    with torch.no_grad():
        if case == "rflow_step":
            unet = maisi_diffusion_unet("rflow", device=device).to(device).eval()
            cn = maisi_controlnet("rflow", device=device).to(device).eval()
            mask = torch.randint(0, 133, (1, 1, *size), dtype=torch.uint8, device=device)
            cond = binarize_labels(mask)
            t = torch.tensor([500.0], device=device)
            cls = torch.tensor([1], device=device)
            spacing = torch.tensor([[150.0, 150.0, 200.0]], device=device)
            times = []
            for _ in range(2):  # the first call warms up kernels / allocators
                _sync(device)
                start = time.perf_counter()
                with amp:
                    down, mid = cn(x=z, timesteps=t, controlnet_cond=cond, class_labels=cls)
                    unet(x=z, timesteps=t, class_labels=cls, spacing_tensor=spacing,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)
                _sync(device)
                times.append(time.perf_counter() - start)
            seconds = min(times)
        else:
            splits = {"decode_splits1": 1, "decode_splits4": 4, "decode_sliding_window": 4}[case]
            vae = maisi_autoencoder(device=device, num_splits=splits).to(device).eval()
            # official ROI 48^3 latent voxels; never the whole latent, so the sliding-window path is exercised
            roi = tuple(min(48, s // 2) for s in latent_shape[2:]) if case == "decode_sliding_window" else tuple(latent_shape[2:])
            inf = MaisiInferer(RFlowScheduler(), vae, None, decode_roi_size=roi, decode_num_splits=splits,
                               decode_overlap=0.25, amp=device.type == "cuda", progress=False)
            _sync(device)
            start = time.perf_counter()
            out = inf.decode(z)
            _sync(device)
            seconds = time.perf_counter() - start
            assert out.shape[2:] == tuple(size)
    return {"case": case, "size": size, "latent": list(latent_shape[2:]), "seconds": round(seconds, 2),
            "peak_gib": round(_peak_gib(device), 2), "device": str(device), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["128,128,128", "256,256,128"])
    parser.add_argument("--cases", nargs="+", default=["rflow_step", "decode_splits1", "decode_splits4", "decode_sliding_window"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:  # child process: one case
        print(json.dumps(run_case(args.case, [int(s) for s in args.size.split(",")], device)))
        return
    results = []
    for size in args.sizes:
        for case in args.cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--size", size, "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                results.append({"case": case, "size": size, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            # other processes on the machine inflate CPU times: record how busy it was
            results[-1]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps(results[-1]), flush=True)
    # projections: steps x step time + whole-volume decode (the faster of the measured decodes)
    for size in args.sizes:
        sz = [int(s) for s in size.split(",")]
        step = next((r for r in results if r.get("size") == sz and r["case"] == "rflow_step" and "seconds" in r), None)
        decodes = [r["seconds"] for r in results if r.get("size") == sz and r["case"].startswith("decode") and "seconds" in r]
        if step and decodes:
            proj = {"case": "projection", "size": sz, "rflow_30_steps_s": round(30 * step["seconds"] + min(decodes), 1),
                    "ddpm_1000_steps_s": round(1000 * step["seconds"] + min(decodes), 1)}
            results.append(proj)
            print(json.dumps(proj), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
