"""ivan_fusion: what reduced precision costs the inverse, and training memory against the number of subjects.

Two measurements quoted in the model card (``bundles/ivan_fusion/docs/README.md``):

``precision``: ``max |f^-1(f(x)) - x|`` and ``max |f(x) - f_fp32(x)|`` of the paper-size network (8 blocks, growth
32; the config's seeded init, or ``--ckpt``) on real slices (SPM avg152 T1, ``[T1, T1]``), in float32, inside an
autocast region with the bundle's default (``reduced_precision: false``: the invertible layers stay float32), and
with ``reduced_precision: true`` (bf16 on CPU; fp16 and bf16 on CUDA when present)::

    python benchmarks/ivan_fusion_resources.py precision [--slices 8] [--ckpt models/model.pt]

``memory``: peak resident memory (``ru_maxrss``) of one epoch through the training data path of ``train.json``
(datalist -> loading, validation, reorientation, normalisation, augmentation -> slice dataset -> DataLoader) for
``--subjects`` simulated subjects, once with the defaults (no volume cache, at most ``cache_volumes`` volumes held,
block sampler) and once with the former default ``cache_rate 1.0`` (every preprocessed volume cached). Each setting
runs ``--repeats`` times in a fresh process; the median is reported. Subjects are the simulated cohort of
``common.data.demo`` (T1/T2 of the demo's simulated subjects, cropped to ``--size`` and varied in intensity per
subject), so the voxel count per subject is small; the card scales the per-subject cost to BraTS volumes::

    python benchmarks/ivan_fusion_resources.py memory --subjects 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ivan_fusion"
sys.path.insert(0, str(REPO))


def _parse(files, ids, **overrides):
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return [parser.get_parsed_content(i) for i in ids]


# ------------------------------------------------------------------------------------------------ precision


def precision(args) -> None:
    import nibabel as nib
    import numpy as np
    import torch

    from common.data.fetch import demo_file

    v = np.asarray(nib.load(str(demo_file("spm/avg152T1.nii"))).dataobj, dtype=np.float32)
    v = np.clip(v / np.percentile(v, 99.5), 0, 1)
    mid = v.shape[2] // 2
    idx = range(mid - args.slices // 2, mid - args.slices // 2 + args.slices)
    x = torch.from_numpy(np.stack([np.stack([v[..., i]] * 2) for i in idx]))  # (S, 2, 91, 109)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for reduced in (False, True):
        (net,) = _parse(["inference.json"], ["network"], reduced_precision=reduced, device="$torch.device('cpu')")
        if args.ckpt:
            net.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True)["model"])
        for device in devices:
            n, xd = net.to(device).eval(), x.to(device)
            with torch.no_grad():
                ref = n(xd)
                dtypes = [None, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
                for dtype in dtypes:
                    if dtype is None and reduced:
                        continue
                    if dtype is None:
                        y, r = ref, n(ref, rev=True)
                    else:
                        with torch.autocast(device, dtype=dtype):
                            y = n(xd)
                            r = n(y, rev=True)
                    rows.append({
                        "device": device, "autocast": "off" if dtype is None else str(dtype).split(".")[-1],
                        "reduced_precision": reduced, "out_dtype": str(y.dtype).split(".")[-1],
                        "inverse_err": float((r.float() - xd).abs().max()),
                        "forward_err": float((y.float() - ref).abs().max()),
                    })
    print(f"network: 8 blocks, growth 32, {'checkpoint ' + args.ckpt if args.ckpt else 'seeded init (seed 0)'}; "
          f"input: {args.slices} real avg152 T1 slices 91x109, [T1, T1]; torch {torch.__version__}")
    print("| device | autocast | reduced_precision | output dtype | max abs inverse error | max abs forward diff vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['autocast']} | {str(r['reduced_precision']).lower()} | {r['out_dtype']} | "
              f"{r['inverse_err']:.2e} | {r['forward_err']:.2e} |")


# ------------------------------------------------------------------------------------------------ memory


def _make_cohort(out: Path, n: int, size: tuple[int, int, int]) -> Path:
    """``n`` subjects from the demo's simulated cohort: T1/T2 cropped to ``size`` around the centre, with a
    per-subject intensity scale and shift of the crop (so no two subjects are identical)."""
    import nibabel as nib
    import numpy as np

    from common.data.demo import build_brain_mri_demo
    from common.data.fetch import cache_dir

    demo = build_brain_mri_demo(cache_dir() / "test-demo", n_train=4, n_val=2, seed=0)  # the tests' cohort
    d = json.loads(demo.read_text())
    sims = [{k: nib.load(str(demo.parent / it[k])) for k in ("t1", "t2")} for it in d["training"]]
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        src = sims[i % len(sims)]
        shape = src["t1"].shape
        lo = [(s - c) // 2 + int(rng.integers(-3, 4)) for s, c in zip(shape, size)]
        sl = tuple(slice(a, a + c) for a, c in zip(lo, size))
        scale = float(rng.uniform(0.5, 2.0))
        item = {"id": f"sub{i:04d}"}
        for k, img in src.items():
            data = np.asarray(img.dataobj, dtype=np.float32)[sl] * scale
            path = out / "subjects" / f"sub{i:04d}_{k}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, img.slicer[sl].affine), str(path))
            item[k] = str(path)
        items.append(item)
    datalist = out / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": items[:1], "test": items[:1]}))
    return datalist


def _one_run(datalist: str, cache_rate: float) -> None:
    """Child process: one epoch through the training data path; prints JSON with the peak RSS."""
    import torch

    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    (loader,) = _parse(["train.json", "task_1to1.json"], ["train#dataloader"], datalist=datalist, cache_rate=cache_rate)
    n_slices, t1 = 0, time.perf_counter()
    for batch in loader:
        n_slices += batch["image"].shape[0]
    cached = getattr(loader.dataset, "_cache", {})
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_imports_mb": base / 1024, "slices": n_slices, "volumes_held": len(cached),
                      "index_s": t1 - t0, "epoch_s": time.perf_counter() - t1}))


def memory(args) -> None:
    size = tuple(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        datalist = _make_cohort(Path(tmp), args.subjects, size)
        print(f"{args.subjects} subjects of {size[0]}x{size[1]}x{size[2]} voxels (T1, T2) written in "
              f"{time.perf_counter() - t0:.0f} s")
        results = {}
        for label, cache_rate in (("default (no volume cache, <= cache_volumes held)", 0.0),
                                  ("cache_rate 1.0 (former default)", 1.0)):
            runs = []
            for _ in range(args.repeats):
                env = dict(os.environ, OMP_NUM_THREADS="1")
                res = subprocess.run([sys.executable, __file__, "_one_run", str(datalist), str(cache_rate)],
                                     capture_output=True, text=True, env=env, check=True)
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            results[label] = runs
            peaks = [r["peak_rss_mb"] for r in runs]
            print(f"{label}: peak RSS median {statistics.median(peaks):.0f} MB (runs {', '.join(f'{p:.0f}' for p in peaks)}); "
                  f"after imports {statistics.median(r['rss_after_imports_mb'] for r in runs):.0f} MB; "
                  f"{runs[0]['slices']} slices per epoch, {runs[0]['volumes_held']} volumes held at the end; "
                  f"index {statistics.median(r['index_s'] for r in runs):.0f} s, epoch {statistics.median(r['epoch_s'] for r in runs):.0f} s")
        # a cached training volume holds the loaded modalities (T1, T2), float32; the channel augmentation and the
        # fusion target are computed per slice
        per_subject = 2 * size[0] * size[1] * size[2] * 4
        print(f"cached bytes per subject at this size: {per_subject / 2**20:.2f} MiB "
              f"(x {args.subjects} = {per_subject * args.subjects / 2**30:.2f} GiB); at BraTS size 240x240x155: "
              f"{2 * 240 * 240 * 155 * 4 / 2**20:.0f} MiB per subject")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one_run":
        _one_run(sys.argv[2], float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("precision")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--ckpt", default=None)
    m = sub.add_parser("memory")
    m.add_argument("--subjects", type=int, default=1000)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--size", type=int, nargs=3, default=[32, 40, 24])
    args = ap.parse_args()
    precision(args) if args.cmd == "precision" else memory(args)


if __name__ == "__main__":
    main()
