#!/usr/bin/env python
"""CPU inference cost of a bundle's sampler against its network-pass floor, and the levers that lower it.

Cases are ``<kind>_<lever>``; each runs in its own process (peak RSS per case), ``--repeats`` times.

**MAISI VAE decode** (``maisi_decode_<mode>``): the official CT VAE configuration (``maisi_autoencoder()``, random
weights: the cost does not depend on them) decodes one 4 x 64 x 64 x 32 latent into the 256 x 256 x 128 CT the
issue names, with ``whole`` (``decode_stage_2_outputs`` on the whole latent, no tensor splitting: the reference
time), ``streaming`` (:func:`common.networks.maisi_streaming_decoder.streaming_decode`, the CPU default) and
``sliding`` (the official sliding window over 48^3 latent windows, overlap 0.6666, 4 tensor splits). Every mode
decodes the same seeded latent; the child writes its output so the parent reports the largest difference to
``whole``.

**diffseg** (paper network ``DiffSegUNet`` 32-64-128-256, 5 steps, paper spacing 1.5 x 1.5 x 5 mm, window
192 x 128 x 128, overlap 0.25, ``sw_batch_size`` 4; random weights, since no trained model ships) on the
held-out demo CT (the TotalSegmentator example, 122 x 101 x 112 at 3 mm) preprocessed by the bundle's own
``inference.json``:

* ``floor_<lever>``: one network forward of one window, timed alone (after a warm-up forward); the floor of
  the sampler is steps x windows x that forward (the sampler batches ``sw_batch_size`` windows per forward);
* ``sampler_<lever>``: the whole ``DiffSegInferer`` call on the preprocessed volume (noise, windows,
  stitching, scheduler steps), with ``in_network_s``, the part of it spent inside the network's passes (so
  ``seconds / in_network_s`` is the loop's own overhead, measured in the same run); the OpenVINO levers call
  the sampler a second time in the same process (``second_call_s``: the compiled model is kept, so that is the
  loop alone, what every further volume costs) and report the largest logit difference between the two calls;

with the levers ``fp32`` (eager PyTorch under ``torch.no_grad``, the bundle's ``runtime: torch``), ``im``
(``torch.inference_mode``), ``cl`` (channels-last 3D memory format for the network and its input, exact),
``bf16`` (bfloat16 autocast, not exact), ``cl_bf16``, ``ov`` (the network passes compiled by OpenVINO in
float32, :class:`common.inferers.openvino.OpenVINONetwork`, the bundle's ``runtime: openvino``; the first
sampler call includes converting and compiling the network, a cost every run pays once; the floor's
``convert_s`` gives it for one window) and ``ov_bf16`` (OpenVINO in bfloat16, not exact).

* ``bundle_<lever>`` (``fp32``, ``ov``, ``ov_bf16``): what a user waits for, ``inference.json`` run end to end on
  the CT (load, resample, body crop, the sampler, inversion to the CT's grid, writing the label file) with a
  checkpoint of the random paper network and ``runtime`` ``torch`` / ``openvino`` (``seconds``: ``run()``;
  ``process_s``: from the interpreter's start, imports and config parsing included).

**iVAN slice loop** (``ivan_floor``, ``ivan_sampler``; paper network of ivan_fusion's ``inference.json``: 8
blocks, growth 32, task T1 -> T2, 2 channels, random weights, since no model ships): a 181 x 217 x 181 volume
(the 1 mm MNI grid of the issue) through the bundle's own ``inferer`` (``SliceInferer`` along axis 2, whole
181 x 217 slices, ``sw_batch_size`` 8) and ``predictor`` (``IVANPredictor``: clamp, channel mean, background
kept). ``ivan_floor`` times one forward of one batch of ``sw_batch_size`` slices (after a warm-up forward); the
floor is that per slice times the number of slices. ``ivan_sampler`` is the whole inferer call, with the time inside the
network's passes measured in the same call.

Each case runs in its own process (peak RSS per case), ``--repeats`` times; the
table gives medians, the ratio sampler / floor, the peak RSS, ``torch.get_num_threads()`` and the 1-minute
load average after the case (other jobs on the machine inflate CPU times).

Usage (from the repository root)::

    python benchmarks/cpu_inference.py --out runs/cpu_inference --cases floor_fp32 floor_cl sampler_fp32 sampler_cl
    python benchmarks/cpu_inference.py --out runs/ivan_slices --repeats 3 --cases ivan_floor ivan_sampler
    python benchmarks/cpu_inference.py --out runs/maisi_decode --repeats 3 \
        --cases maisi_decode_whole maisi_decode_streaming maisi_decode_sliding

Writes ``<out>/results.json`` and prints one JSON line per run.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: the bundle cases report the time a user waits

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUNDLE = REPO / "bundles" / "diffseg"
LEVERS = ("fp32", "im", "cl", "bf16", "cl_bf16", "ov", "ov_bf16")
DECODE_MODES = ("whole", "streaming", "sliding")
MAISI_LATENT = (1, 4, 64, 64, 32)
IVAN_BUNDLE = REPO / "bundles" / "ivan_fusion"
IVAN_VOLUME = (181, 217, 181)
IVAN_CASES = ("ivan_floor", "ivan_sampler")


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _test_ct() -> str:
    from common.data import demo
    from common.data.fetch import cache_dir

    root = cache_dir() / "cpu-inference"
    root.mkdir(parents=True, exist_ok=True)
    datalist = json.loads(Path(demo.build_ct_demo(root, n_train=1, n_val=1, seed=0)).read_text())
    return str(Path(root) / "ct" / datalist["test"][0]["image"])


def _diffseg_inputs():
    """The paper-configuration network, inferer and preprocessed test CT of diffseg's inference.json."""
    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    wf = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type="infer", bundle_root=str(BUNDLE), input_image=_test_ct(), output_dir="/tmp/cpu-inference-unused",
    )
    wf.initialize()
    item = wf.parser.get_parsed_content("preprocessing")({"image": wf.parser["input_image"]})
    torch.manual_seed(0)
    network = wf.parser.get_parsed_content("network").eval()
    inferer = wf.parser.get_parsed_content("inferer")
    return network, inferer, item["image"].as_tensor()[None]


def _windows(inferer, shape) -> int:
    from monai.data.utils import dense_patch_slices
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    from monai.inferers.utils import _get_scan_interval

    roi = fall_back_tuple(ensure_tuple_rep(inferer.roi_size, len(shape)), shape)
    padded = [max(r, s) for r, s in zip(roi, shape)]  # DiffSegInferer pads the volume up to one window
    interval = _get_scan_interval(padded, roi, len(shape), ensure_tuple_rep(inferer.sw_kwargs["overlap"], len(shape)))
    return len(dense_patch_slices(padded, roi, interval))


def run_maisi_decode(mode: str, out: str | None, latent=MAISI_LATENT) -> dict:
    from common.networks.maisi import maisi_autoencoder, set_num_splits
    from common.networks.maisi_streaming_decoder import streaming_decode

    torch.manual_seed(0)
    vae = maisi_autoencoder(device="cpu").eval()
    z = torch.randn(tuple(latent))
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            image = set_num_splits(vae, 1).decode_stage_2_outputs(z)
        elif mode == "streaming":
            image = streaming_decode(vae, z, chunk=8)
        else:
            from monai.inferers import SlidingWindowInferer

            set_num_splits(vae, 4)
            image = SlidingWindowInferer((48, 48, 48), 1, 0.6666, mode="gaussian")(z, vae.decode_stage_2_outputs)
    seconds = time.perf_counter() - start
    if out:
        torch.save(image.float(), out)
    return {"case": f"maisi_decode_{mode}", "seconds": round(seconds, 2), "latent": list(latent),
            "output": list(image.shape), "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads()}


def run_bundle(lever: str) -> dict:
    """diffseg's inference.json end to end on the test CT, random paper network, ``runtime`` by lever."""
    import tempfile

    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    work = Path(tempfile.mkdtemp(prefix="cpu-inference-bundle-"))
    overrides = {"runtime": "torch"} if lever == "fp32" else {
        "runtime": "openvino", "runtime_precision": "bf16" if lever == "ov_bf16" else "f32"}
    wf = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type="infer", bundle_root=str(BUNDLE), input_image=_test_ct(), output_dir=str(work / "out"),
        ckpt_dir=str(work), **overrides,
    )
    torch.manual_seed(0)
    torch.save(wf.parser.get_parsed_content("network_def").state_dict(), work / "model.pt")
    start = time.perf_counter()
    wf.initialize()
    wf.run()
    seconds = time.perf_counter() - start
    wf.finalize()
    assert len(list((work / "out").rglob("*_seg.nii.gz"))) == 1
    return {"case": f"bundle_{lever}", "seconds": round(seconds, 2), "process_s": round(time.perf_counter() - PROCESS_START, 2),
            "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads()}


def _time_network_passes(network, openvino: bool) -> dict:
    """Seconds spent inside the network's passes during a sampler call (``{"s", "n"}``, updated in place): forward
    hooks on the PyTorch module, or the OpenVINO wrapper's call (the class is patched in this child process only;
    the first call's passes include the conversion and compilation)."""
    spent = {"s": 0.0, "n": 0, "t0": 0.0}

    def pre(*_):
        spent["t0"] = time.perf_counter()

    def post(*_):
        spent["s"] += time.perf_counter() - spent["t0"]
        spent["n"] += 1

    if not openvino:
        network.register_forward_pre_hook(pre)
        network.register_forward_hook(post)
        return spent
    from common.inferers.openvino import OpenVINONetwork

    call = OpenVINONetwork.__call__

    def timed(self, x, t=None):
        pre()
        try:
            return call(self, x, t)
        finally:
            post()

    OpenVINONetwork.__call__ = timed
    return spent


def run_ivan(case: str, volume_shape=IVAN_VOLUME) -> dict:
    """ivan_fusion's slice loop on a 181 x 217 x 181 volume (see the module docstring)."""
    import math

    from monai.bundle import ConfigParser

    sys.path.insert(0, str(IVAN_BUNDLE))
    parser = ConfigParser()
    parser.read_config([str(IVAN_BUNDLE / "configs" / f) for f in ("inference.json", "task_1to1.json")])
    parser["bundle_root"] = str(IVAN_BUNDLE)
    torch.manual_seed(0)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    predictor = parser.get_parsed_content("predictor")  # wraps the same network instance
    assert predictor.network is network
    channels, batch = network.channels, int(parser.get_parsed_content("sw_batch_size"))
    volume_shape = tuple(int(v) for v in volume_shape)
    slices = volume_shape[parser.get_parsed_content("slice_axis")]
    gen = torch.Generator().manual_seed(0)
    extra = {}
    with torch.no_grad():
        if case == "ivan_floor":
            x = torch.rand(batch, channels, volume_shape[0], volume_shape[1], generator=gen)
            network(x)  # warm-up: oneDNN primitive creation
            start = time.perf_counter()
            network(x)
            seconds = time.perf_counter() - start
        else:
            volume = torch.rand(1, channels, *volume_shape, generator=gen)
            in_network = _time_network_passes(network, openvino=False)
            start = time.perf_counter()
            pred = inferer(volume, predictor)
            seconds = time.perf_counter() - start
            assert tuple(pred.shape) == (1, 1, *volume_shape), pred.shape
            extra["in_network_s"] = round(in_network["s"], 2)
            extra["network_calls"] = in_network["n"]
    return {**extra, "case": case, "seconds": round(seconds, 2), "volume": list(volume_shape), "slices": slices,
            "batch": batch, "batches": math.ceil(slices / batch), "channels": channels,
            "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads()}


def run_case(case: str, out: str | None = None, latent=MAISI_LATENT, ivan_volume=IVAN_VOLUME) -> dict:
    if case.startswith("maisi_decode_"):
        return run_maisi_decode(case[len("maisi_decode_"):], out, latent)
    if case in IVAN_CASES:
        return run_ivan(case, ivan_volume)
    kind, lever = case.split("_", 1)
    if kind == "bundle":
        return run_bundle(lever)
    network, inferer, image = _diffseg_inputs()
    extra = {}
    inferer.runtime = "torch"  # inference.json's default is auto (OpenVINO where installed): the PyTorch levers pin it
    if lever.startswith("ov"):
        from common.inferers.openvino import OpenVINONetwork

        precision = "bf16" if lever == "ov_bf16" else "f32"
        inferer.runtime, inferer.runtime_precision = "openvino", precision
    if lever in ("cl", "cl_bf16"):
        network = network.to(memory_format=torch.channels_last_3d)
    grad_off = torch.inference_mode if lever == "im" else torch.no_grad
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in lever)
    windows = _windows(inferer, list(image.shape[2:]))
    batch = min(inferer.sw_kwargs["sw_batch_size"], windows)
    steps = inferer.scheduler.num_timesteps
    with grad_off(), autocast:
        if kind == "floor":
            x = torch.randn(1, image.shape[1] + inferer.num_classes, *inferer.roi_size)
            if lever in ("cl", "cl_bf16"):
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if lever.startswith("ov"):
                network = OpenVINONetwork(network, precision=precision, shape_multiple=getattr(network, "divisor", None))
            start = time.perf_counter()
            network(x, 1)  # warm-up: oneDNN primitive creation, or OpenVINO's conversion and compilation
            extra["convert_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            network(x, 1)
            seconds = time.perf_counter() - start
        else:
            if lever in ("cl", "cl_bf16"):
                image = image.contiguous(memory_format=torch.channels_last_3d)
            in_network = _time_network_passes(network, lever.startswith("ov"))
            start = time.perf_counter()
            logits = inferer(image, network)
            seconds = time.perf_counter() - start
            assert logits.shape[2:] == image.shape[2:]
            extra["in_network_s"] = round(in_network["s"], 2)
            extra["network_calls"] = in_network["n"]
            if inferer._compiled is not None:
                extra["conversions"] = inferer._compiled.conversions
                # the same call again: the compiled model is kept by the inferer, so this is the loop alone (what
                # every further volume of a run or a MONAI Label server costs)
                in_network.update(s=0.0, n=0)
                start = time.perf_counter()
                again = inferer(image, network)
                extra["second_call_s"] = round(time.perf_counter() - start, 2)
                extra["second_call_in_network_s"] = round(in_network["s"], 2)
                extra["second_call_max_abs_diff"] = float((again - logits).abs().max())
            if out:
                torch.save(logits.float(), out)
    return {**extra,
        "case": case, "seconds": round(seconds, 2), "volume": list(image.shape[2:]), "windows": windows,
        "batch": batch, "steps": steps, "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=[f"{k}_{lv}" for k in ("floor", "sampler") for lv in ("fp32", "cl")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/cpu_inference")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--maisi-latent", type=int, nargs=5, default=list(MAISI_LATENT), help="latent shape of the decode cases")
    ap.add_argument("--ivan-volume", type=int, nargs=3, default=list(IVAN_VOLUME),
                    help="volume shape of the ivan cases")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:  # child process: one run of one case
        print(json.dumps(run_case(args.case, args.save, args.maisi_latent, args.ivan_volume)))
        return
    runs, saved = [], {}
    work = Path(args.out or "runs/cpu_inference")
    work.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        if case.startswith("maisi_decode_"):
            if case[len("maisi_decode_"):] not in DECODE_MODES:
                raise SystemExit(f"unknown decode mode in case {case!r}; expected maisi_decode_ + one of {DECODE_MODES}")
        elif case not in IVAN_CASES and (
                case.split("_", 1)[0] not in ("floor", "sampler", "bundle") or case.split("_", 1)[1] not in LEVERS):
            raise SystemExit(f"unknown case {case!r}; expected floor_/sampler_/bundle_ + one of {LEVERS}, "
                             f"maisi_decode_ + one of {DECODE_MODES}, or one of {IVAN_CASES}")
        for rep in range(args.repeats):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads),
                   "--maisi-latent", *map(str, args.maisi_latent), "--ivan-volume", *map(str, args.ivan_volume)]
            if (case.startswith("maisi_decode_") or case.startswith("sampler_")) and rep == 0:
                saved[case] = work / f"{case}.pt"
                cmd += ["--save", str(saved[case])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            runs.append(run)
            print(json.dumps(run), flush=True)
    table = []
    for case in args.cases:
        rs = [r for r in runs if r["case"] == case]
        row = {"case": case, "median_s": statistics.median(r["seconds"] for r in rs), "runs": len(rs),
               "peak_gib": max(r["peak_gib"] for r in rs), "load_max": max(r["load_average_1min_after"] for r in rs)}
        if case.startswith("floor"):
            r0 = rs[0]
            row["floor_s"] = round(row["median_s"] * r0["steps"] * r0["windows"], 2)
        if case == "ivan_floor":
            row["floor_s"] = round(row["median_s"] * rs[0]["slices"] / rs[0]["batch"], 2)  # per-slice cost x slices
        if case.startswith("sampler") or case == "ivan_sampler":
            # the loop's own overhead, from one run: total over the time inside the network's passes
            row["in_network_median_s"] = statistics.median(r["in_network_s"] for r in rs)
            row["ratio_to_in_network"] = round(row["median_s"] / row["in_network_median_s"], 3)
            if all("second_call_s" in r for r in rs):
                row["second_call_median_s"] = statistics.median(r["second_call_s"] for r in rs)
                row["second_call_in_network_median_s"] = statistics.median(r["second_call_in_network_s"] for r in rs)
                row["second_call_ratio_to_in_network"] = round(
                    row["second_call_median_s"] / row["second_call_in_network_median_s"], 3)
        table.append(row)
    for row in table:
        if row["case"].startswith("sampler") or row["case"] == "ivan_sampler":
            floor_case = "ivan_floor" if row["case"] == "ivan_sampler" else "floor_" + row["case"].split("_", 1)[1]
            floor = next((f for f in table if f["case"] == floor_case), None)
            if floor:
                row["ratio_to_floor"] = round(row["median_s"] / floor["floor_s"], 3)
                if "second_call_median_s" in row:
                    row["second_call_ratio_to_floor"] = round(row["second_call_median_s"] / floor["floor_s"], 3)
    whole = saved.get("maisi_decode_whole")
    for row in table:
        if row["case"] in saved and whole is not None and row["case"] != "maisi_decode_whole":
            ref, got = torch.load(whole), torch.load(saved[row["case"]])
            row["max_abs_diff_to_whole"] = float((got - ref).abs().max())
            row["ref_max_abs"] = float(ref.abs().max())
        ref_row = next((r for r in table if r["case"] == "maisi_decode_whole"), None)
        if ref_row and row["case"].startswith("maisi_decode_"):
            row["time_ratio_to_whole"] = round(row["median_s"] / ref_row["median_s"], 3)
    plain = saved.get("sampler_fp32")  # the bundle's runtime: torch, fp32: the reference of every sampler lever
    for row in table:
        if row["case"].startswith("sampler_") and row["case"] in saved and plain is not None and row["case"] != "sampler_fp32":
            ref, got = torch.load(plain), torch.load(saved[row["case"]])
            row["max_abs_logit_diff_to_fp32"] = float((got - ref).abs().max())
            row["label_agreement_with_fp32"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
    for path in saved.values():
        path.unlink(missing_ok=True)
    for row in table:
        print(json.dumps(row))
    meta = {"command": "python benchmarks/cpu_inference.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_count": os.cpu_count(), "torch": torch.__version__}
    (work / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "table": table}, indent=1))


if __name__ == "__main__":
    main()
