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
``convert_s`` gives it for one window), ``ov_bf16`` (OpenVINO in bfloat16, not exact) and ``ov_fit`` (OpenVINO in
float32 with ``fit_window``: the window shrinks to the CT's 68 slices, rounded up to 80, instead of the CT being
padded to the window's 128; not exact: the network sees other windows; its floor is timed on that window),
``ov_fit_bf16`` (``ov_fit`` in bfloat16: what ``inference.json``'s ``runtime_precision: auto`` runs on a CPU with
bfloat16 units; each OpenVINO case records ``precision_used``, float32 where a bf16 request met no such units) and
``ov_grow`` (``ov_fit`` with the window also grown to cover the axes up to ``max_window_fraction`` of the configured
window: one 256 x 208 x 80 window instead of four of 192 x 128 x 80; opt-in, it costs Dice: the diffseg card).

* ``bundle_<lever>`` (``fp32``, ``ov``, ``ov_bf16``, ``ov_fit``, ``ov_fit_bf16``, ``ov_grow``): what a user waits for, ``inference.json`` run end to end on
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

**Latent diffusion samplers** (``aldm_floor``, ``aldm_sampler``, ``noddi_floor``, ``noddi_sampler``; the paper
networks of each bundle's ``inference.json``, random weights, since no model ships):

* aldm_translation (VQ-GAN ch 256, f = 4; MS-SPADE; LDM UNet 128-256-512 with cross-attention; DDIM 200 steps,
  eta 1): one random source volume of the configured ``roi_size`` (192 x 192 x 144; ``--aldm-volume``) through
  the bundle's ``ALDMTranslationInferer`` into every configured target (t1ce, t2, flair): the source encoded once,
  then per target SPADE, one UNet pass per step and a decode. ``aldm_floor`` times each of these passes once,
  after a warm-up: the UNet (``seconds``) and, in ``parts_s``, encode, SPADE and decode; the floor is
  ``seconds`` x steps x targets + ``once_s`` (encode + targets x (SPADE + decode)).
* noddi_sr (condition encoder, VQ-GAN ch 64, f = 2, UNet 128-256-256-512; DDIM 100 steps, eta 0): one random LR
  feature volume, by default one window of the configured ``lr_patch`` (32^3; ``--noddi-volume``, e.g.
  ``68 86 68``, the LR HCP grid of 36 windows), through the bundle's ``NODDISRInferer`` (sliding windows,
  ``sw_batch_size`` windows per pass; per batch: the encoder, one UNet pass per step, the nearest-code lookup and
  the decoder). ``noddi_floor`` times the passes of one batch of windows; the floor is (``seconds`` x steps +
  ``once_s``) x windows / batch.

* maisi_ct (``maisi_floor``, ``maisi_sampler``; ``--maisi-version`` ``rflow`` (default) or ``ddpm``, the official
  networks of each; ``--maisi-output``, default the config's ``output_size``): the reverse process of the bundle's
  ``MaisiInferer`` (``sample_latent``: per step one ControlNet + diffusion UNet evaluation and the scheduler step)
  on one random label mask. ``maisi_floor`` times one ControlNet + UNet evaluation as the loop makes it, after a
  warm-up; the floor is that x steps. The VAE decode, once per sample, has its own cases (above).

The sampler cases report ``in_network_s``, every network pass of the call (forward hooks on each module the
inferer calls; NODDI's nearest-code lookup is a method, timed by wrapping it), ``network_calls``, the UNet's passes
(steps x targets; steps x batches of windows), and ``passes`` / ``passes_s`` per module. Outside the passes stay
the scheduler steps, the noise, the concatenations, the latent normalisation and the window stitching. The
sampler's once-per-volume passes run cold (oneDNN creates its primitives on a first call) where the floor's are
warm, so with few steps that first-call cost is part of what exceeds the floor. Paper-scale sampling costs hours of
CPU time: ``--steps`` (default: the config's) shortens the sampler and the floor alike, and the loop / floor ratio
is what is measured. ``--overlays`` reads more configs of the bundle over ``inference.json`` (``light.json``; the
tests use ``tiny.json``).

Each case runs in its own process (peak RSS per case), ``--repeats`` times, the cases taking turns (all once, then
all again: a drift of the machine's speed reaches every case alike); the
table gives medians, the ratio sampler / floor, the peak RSS, ``torch.get_num_threads()`` and the 1-minute
load average after the case (other jobs on the machine inflate CPU times).

Usage (from the repository root)::

    python benchmarks/cpu_inference.py --out runs/cpu_inference --cases floor_fp32 floor_cl sampler_fp32 sampler_cl
    python benchmarks/cpu_inference.py --out runs/ivan_slices --repeats 3 --cases ivan_floor ivan_sampler
    python benchmarks/cpu_inference.py --out runs/maisi_sampler --repeats 3 --maisi-output 256 256 128 --steps 5 \
        --cases maisi_floor maisi_sampler
    python benchmarks/cpu_inference.py --out runs/aldm_sampler --repeats 1 --steps 10 \
        --cases aldm_floor aldm_sampler
    python benchmarks/cpu_inference.py --out runs/noddi_sampler --repeats 1 --steps 10 \
        --cases noddi_floor noddi_sampler
    python benchmarks/cpu_inference.py --out runs/maisi_decode --repeats 3 \
        --cases maisi_decode_whole maisi_decode_streaming maisi_decode_sliding

Writes ``<out>/results.json`` and prints one JSON line per run.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: the bundle cases report the time a user waits

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
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
LEVERS = ("fp32", "im", "cl", "bf16", "cl_bf16", "ov", "ov_bf16", "ov_fit", "ov_fit_bf16", "ov_grow")
GROW_FRACTION = 1.75  # max_window_fraction of the ov_grow lever: the paper CT's 243 x 198 in-plane in one window
DECODE_MODES = ("whole", "streaming", "sliding")
MAISI_LATENT = (1, 4, 64, 64, 32)
IVAN_BUNDLE = REPO / "bundles" / "ivan_fusion"
IVAN_VOLUME = (181, 217, 181)
IVAN_CASES = ("ivan_floor", "ivan_sampler")
ALDM_BUNDLE = REPO / "bundles" / "aldm_translation"
NODDI_BUNDLE = REPO / "bundles" / "noddi_sr"
MAISI_BUNDLE = REPO / "bundles" / "maisi_ct"
LDM_CASES = ("aldm_floor", "aldm_sampler", "noddi_floor", "noddi_sampler", "maisi_floor", "maisi_sampler")
FLOOR_OF = {"ivan_sampler": "ivan_floor", "aldm_sampler": "aldm_floor", "noddi_sampler": "noddi_floor",
            "maisi_sampler": "maisi_floor"}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _test_ct() -> str:
    from common.data import demo
    from common.data.fetch import cache_dir

    root = cache_dir() / "cpu-inference"
    root.mkdir(parents=True, exist_ok=True)
    datalist = json.loads(Path(demo.build_ct_demo(root, n_train=1, n_val=1, seed=0)).read_text())
    return str(Path(root) / "ct" / datalist["test"][0]["image"])


def _diffseg_inputs(sw_batch_size: int | None = None):
    """The paper-configuration network, inferer and preprocessed test CT of diffseg's inference.json (with another
    ``sw_batch_size``: windows per network pass, where given)."""
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
    if sw_batch_size is not None:
        inferer.sw_kwargs["sw_batch_size"] = int(sw_batch_size)
    return network, inferer, item["image"].as_tensor()[None]


def _windows(inferer, shape, roi) -> int:
    """How many windows of size ``roi`` (``inferer.window_size``) the inferer runs per step on a ``shape`` volume:
    the grid of the inferer's own per-step windows on the volume padded up to one window, as the inferer pads it."""
    from common.inferers.diffseg import _StepWindows

    padded = [max(r, s) for r, s in zip(roi, shape)]
    return len(_StepWindows(padded, roi, inferer.sw_kwargs["overlap"], 1, 1).windows)


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


def lever_settings(lever: str) -> dict:
    """The ``inference.json`` keys of a diffseg lever: who runs the passes, in which arithmetic, in which windows."""
    openvino = lever.startswith("ov")
    return {
        "runtime": "openvino" if openvino else "torch",
        "runtime_precision": "bf16" if openvino and lever.endswith("bf16") else "f32",
        "fit_window": lever in ("ov_fit", "ov_fit_bf16", "ov_grow"),
        "max_window_fraction": GROW_FRACTION if lever == "ov_grow" else 1.0,
    }


def run_bundle(lever: str, sw_batch_size: int | None = None) -> dict:
    """diffseg's inference.json end to end on the test CT, random paper network, ``runtime`` by lever."""
    import tempfile

    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    work = Path(tempfile.mkdtemp(prefix="cpu-inference-bundle-"))
    overrides = lever_settings(lever)
    if sw_batch_size is not None:
        overrides["sw_batch_size"] = int(sw_batch_size)
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
    compiled = getattr(wf.parser.get_parsed_content("inferer"), "_compiled", None)
    wf.finalize()
    assert len(list((work / "out").rglob("*_seg.nii.gz"))) == 1
    return {"case": f"bundle_{lever}", "seconds": round(seconds, 2),
            "precision_used": None if compiled is None else compiled.precision_used, "process_s": round(time.perf_counter() - PROCESS_START, 2),
            "sw_batch_size": wf.parser.get_parsed_content("sw_batch_size"), "peak_gib": round(_peak_gib(), 2),
            "threads": torch.get_num_threads()}


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
    parser = _bundle_parser(IVAN_BUNDLE, ("task_1to1.json",), {})
    torch.manual_seed(0)
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
            seconds, _ = _timed_pass(network, x)
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


def _time_method(obj, name: str) -> dict:
    """:func:`_time_network_passes` for a pass the inferer reaches through a method, not through a module's
    forward (a forward hook never sees it): the VQ-GAN's nearest-code ``lookup`` of NODDI-SR's decode. The
    method is replaced on this instance only, in this child process."""
    spent = {"s": 0.0, "n": 0}
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - start
            spent["n"] += 1

    setattr(obj, name, timed)
    return spent


def _timed_pass(fn, *args, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds of one call of ``fn`` after a warm-up call (oneDNN primitive creation), and its output."""
    fn(*args, **kwargs)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _bundle_parser(bundle: Path, overlays, overrides: dict):
    """``inference.json`` of ``bundle`` on the CPU, with the bundle's ``overlays`` (e.g. ``tiny.json`` or a task
    overlay, read over it) and ``overrides`` (the step count) set before anything is parsed."""
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(bundle))  # the bundle's own ``scripts`` package (one bundle per child process)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in ("inference.json", *overlays)])
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    for key, value in overrides.items():
        if value is not None:
            parser[key] = value
    return parser


def _ldm_passes(passes: dict) -> dict:
    """The fields of a sampler case from the timed passes: ``in_network_s`` sums every network pass of the call,
    ``network_calls`` counts the diffusion UNet's (the looped network), ``passes`` / ``passes_s`` give each."""
    return {"in_network_s": round(sum(p["s"] for p in passes.values()), 4), "network_calls": passes["unet"]["n"],
            "passes": {k: p["n"] for k, p in passes.items()},
            "passes_s": {k: round(p["s"], 4) for k, p in passes.items()}}


def run_aldm(case: str, volume_shape=None, steps: int | None = None, overlays=()) -> dict:
    """aldm_translation's translation of one source volume into every configured target (see the module
    docstring): ``aldm_floor`` times each network pass once, ``aldm_sampler`` runs the bundle's own inferer."""
    from common.networks.aldm_ldm import target_condition

    # random weights load no stage-3 checkpoint, so a ``scale_factor`` of "auto" (the demo overlay's) has no value to
    # read: any number costs the same
    parser = _bundle_parser(ALDM_BUNDLE, overlays, {"num_inference_steps": steps})
    if parser["scale_factor"] == "auto":
        parser["scale_factor"] = 1.0
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").eval()
    unet = parser.get_parsed_content("diffusion_model").eval()
    inferer = parser.get_parsed_content("inferer")
    assert inferer.diffusion_model is unet and inferer.mode == "diffusion"
    targets = parser.get_parsed_content("targets")
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    steps = inferer.sampler.num_inference_steps
    volume_shape = tuple(int(v) for v in (volume_shape or parser.get_parsed_content("roi_size")))
    x = torch.rand(1, 1, *volume_shape, generator=torch.Generator().manual_seed(0))
    ae = network.autoencoder
    extra = {}
    with torch.no_grad():
        if case == "aldm_floor":
            # the passes of one target, each after a warm-up; the UNet's input as the sampler builds it
            encode_s, z_src = _timed_pass(network.encode, x)
            spade_s, c = _timed_pass(network.translate_latent, z_src, targets[0])
            s = inferer.scale_factor
            kwargs = target_condition(targets[0], inferer.modalities, inferer.conditioning, batch_size=1)
            z = torch.randn(z_src.shape, generator=torch.Generator().manual_seed(1))
            t = torch.full((1,), int(inferer.sampler.scheduler.num_train_timesteps) - 1, dtype=torch.long)
            seconds, _ = _timed_pass(unet, torch.cat([s * z_src, s * c, z], dim=1), t, **kwargs)
            decode_s, _ = _timed_pass(network.decode, z)
            extra["parts_s"] = {"encode": round(encode_s, 4), "spade": round(spade_s, 4),
                                "decode": round(decode_s, 4)}
            # what runs once per volume: one encode of the source, SPADE and a decode per target
            extra["once_s"] = round(encode_s + len(targets) * (spade_s + decode_s), 4)
            extra["latent"] = list(z_src.shape[1:])
        else:
            passes = {name: _time_network_passes(module, openvino=False) for name, module in (
                ("unet", unet), ("encoder", ae.encoder), ("quant_conv", ae.quant_conv), ("quantizer", ae.quantizer),
                ("spade", network.spade), ("post_quant_conv", ae.post_quant_conv), ("decoder", ae.decoder))}
            start = time.perf_counter()
            pred = inferer(x, network, targets=targets)
            seconds = time.perf_counter() - start
            assert tuple(pred.shape) == (1, len(targets), *volume_shape), pred.shape
            extra.update(_ldm_passes(passes))
    return {**extra, "case": case, "seconds": round(seconds, 4), "volume": list(volume_shape), "steps": steps,
            "targets": len(targets), "overlays": list(overlays), "peak_gib": round(_peak_gib(), 2),
            "threads": torch.get_num_threads()}


def run_noddi(case: str, volume_shape=None, steps: int | None = None, overlays=()) -> dict:
    """noddi_sr's sliding-window DDIM on one LR feature volume (see the module docstring): ``noddi_floor`` times
    each network pass of one batch of windows once, ``noddi_sampler`` runs the bundle's own inferer."""
    parser = _bundle_parser(NODDI_BUNDLE, overlays, {"ddim_steps": steps})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    assert inferer.sampler is not None and inferer.num_samples == 1, "one DDIM sample per window"
    channels = int(parser.get_parsed_content("n_feat"))
    steps = inferer.sampler.num_inference_steps
    roi = tuple(int(v) for v in parser.get_parsed_content("lr_patch"))
    volume_shape = tuple(int(v) for v in (volume_shape or roi))
    windows = inferer.count_windows(volume_shape, channels)
    batch = min(inferer.sw_batch_size, windows)
    gen = torch.Generator().manual_seed(0)
    extra = {}
    with torch.no_grad():
        if case == "noddi_floor":
            f = torch.rand(batch, channels, *roi, generator=gen)
            encode_s, c = _timed_pass(network.condition, f)  # condition encoder (+ the latent normalisation)
            z = torch.randn(c.shape, generator=gen)
            t = torch.full((batch,), int(inferer.sampler.scheduler.num_train_timesteps) - 1, dtype=torch.long)
            seconds, _ = _timed_pass(network.unet, torch.cat([c, z], dim=1), t)
            decode_s, _ = _timed_pass(network.decode, z)  # nearest code, post_quant_conv, VQ-GAN decoder
            extra["parts_s"] = {"encode": round(encode_s, 4), "decode": round(decode_s, 4)}
            extra["once_s"] = round(encode_s + decode_s, 4)  # once per batch of windows
            extra["latent"] = list(c.shape[1:])
        else:
            vqgan = network.vqgan
            passes = {name: _time_network_passes(module, openvino=False) for name, module in (
                ("unet", network.unet), ("encoder", network.encoder), ("post_quant_conv", vqgan.post_quant_conv),
                ("decoder", vqgan.decoder))}
            passes["lookup"] = _time_method(vqgan.quantizer, "lookup")
            features = torch.rand(1, channels, *volume_shape, generator=gen)
            start = time.perf_counter()
            pred = inferer(features, network)
            seconds = time.perf_counter() - start
            scale = int(parser.get_parsed_content("scale"))
            assert tuple(pred.shape) == (1, 3, *(scale * v for v in volume_shape)), pred.shape
            extra.update(_ldm_passes(passes))
    return {**extra, "case": case, "seconds": round(seconds, 4), "volume": list(volume_shape), "roi": list(roi),
            "windows": windows, "batch": batch, "batches": math.ceil(windows / batch), "steps": steps,
            "channels": channels, "overlays": list(overlays), "peak_gib": round(_peak_gib(), 2),
            "threads": torch.get_num_threads()}


def run_maisi(case: str, output_size=None, steps: int | None = None, overlays=(), version: str = "rflow") -> dict:
    """maisi_ct's reverse process (``MaisiInferer.sample_latent``: ControlNet + UNet per step, the scheduler step) on
    one random label mask of ``output_size`` (the config's by default): ``maisi_floor`` times one ControlNet + UNet
    evaluation (``_denoise``, as the loop calls it) after a warm-up, ``maisi_sampler`` runs the loop. The decode is
    not part of either: its own cases (``maisi_decode_*``) measure it."""
    parser = _bundle_parser(MAISI_BUNDLE, overlays, {"version": version, "num_inference_steps": steps})
    torch.manual_seed(0)
    unet = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    output_size = tuple(int(v) for v in (output_size or parser.get_parsed_content("output_size")))
    steps = int(inferer.num_inference_steps)
    # a body (200) holding random organ ids: the ControlNet's input is the binarised label map, any ids cost the same
    mask = torch.full((1, 1, *output_size), 200, dtype=torch.long)
    mask[:, :, ::2] = torch.randint(1, 120, (1, 1, (output_size[0] + 1) // 2, *output_size[1:]),
                                    generator=torch.Generator().manual_seed(0))
    spacing = torch.tensor(parser.get_parsed_content("spacing"), dtype=torch.float32)
    extra = {}
    with torch.no_grad():
        if case == "maisi_floor":
            latent = torch.randn(1, unet.in_channels, *(v // 4 for v in output_size))
            cond, labels, extra_kw = inferer.denoise_inputs(mask, unet, spacing, torch.device("cpu"))
            t = torch.full((1,), 500.0)
            seconds, _ = _timed_pass(inferer._denoise, unet, latent, t, cond, labels, extra_kw)
        else:
            passes = {"unet": _time_network_passes(unet, openvino=False)}
            if inferer.controlnet is not None:
                passes["controlnet"] = _time_network_passes(inferer.controlnet, openvino=False)
            start = time.perf_counter()
            latent = inferer.sample_latent(mask, unet, spacing)
            seconds = time.perf_counter() - start
            assert tuple(latent.shape[2:]) == tuple(v // 4 for v in output_size), latent.shape
            extra.update(_ldm_passes(passes))
    return {**extra, "case": case, "seconds": round(seconds, 4), "volume": list(output_size), "steps": steps,
            "version": version, "cfg_guidance_scale": float(inferer.cfg_guidance_scale), "overlays": list(overlays),
            "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads()}


def run_case(case: str, out: str | None = None, latent=MAISI_LATENT, ivan_volume=IVAN_VOLUME, aldm_volume=None,
             noddi_volume=None, steps: int | None = None, overlays=(), maisi_output=None,
             maisi_version: str = "rflow", sw_batch_size: int | None = None) -> dict:
    if case.startswith("maisi_decode_"):
        return run_maisi_decode(case[len("maisi_decode_"):], out, latent)
    if case in ("maisi_floor", "maisi_sampler"):
        return run_maisi(case, maisi_output, steps, overlays, maisi_version)
    if case in IVAN_CASES:
        return run_ivan(case, ivan_volume)
    if case.startswith("aldm_"):
        return run_aldm(case, aldm_volume, steps, overlays)
    if case.startswith("noddi_"):
        return run_noddi(case, noddi_volume, steps, overlays)
    kind, lever = case.split("_", 1)
    if kind == "bundle":
        return run_bundle(lever, sw_batch_size)
    network, inferer, image = _diffseg_inputs(sw_batch_size)
    extra = {}
    # inference.json's CPU defaults (runtime and precision auto, windows fitted) are pinned by the lever
    settings = lever_settings(lever)
    for key, value in settings.items():
        setattr(inferer, key, value)
    precision = settings["runtime_precision"]
    if lever.startswith("ov"):
        from common.inferers.openvino import OpenVINONetwork
    if lever in ("cl", "cl_bf16"):
        network = network.to(memory_format=torch.channels_last_3d)
    grad_off = torch.inference_mode if lever == "im" else torch.no_grad
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever in ("bf16", "cl_bf16"))
    window = inferer.window_size(image.shape[2:], network)  # the configured one, or fitted to the CT (ov_fit...)
    windows = _windows(inferer, list(image.shape[2:]), window)
    batch = min(inferer.sw_kwargs["sw_batch_size"], windows)
    steps = inferer.scheduler.num_timesteps
    with grad_off(), autocast:
        if kind == "floor":
            x = torch.randn(1, image.shape[1] + inferer.num_classes, *window)
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
            if lever.startswith("ov"):
                extra["precision_used"] = network.precision_used  # f32 where a bf16 request met no bf16 units
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
                extra["precision_used"] = inferer._compiled.precision_used
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
        "window": list(window),
        "batch": batch, "steps": steps, "peak_gib": round(_peak_gib(), 2), "threads": torch.get_num_threads(),
    }


def summarise(cases, runs) -> list[dict]:
    """One table row per case from its runs (each with ``load_average_1min_after``, added by the parent): medians,
    the floors (the per-pass time of a floor case scaled to what the sampler runs) and the sampler rows' ratios
    to the time inside the network's passes and to the floor of the same kind."""
    table = []
    for case in cases:
        rs = [r for r in runs if r["case"] == case]
        row = {"case": case, "median_s": statistics.median(r["seconds"] for r in rs), "runs": len(rs),
               "peak_gib": max(r["peak_gib"] for r in rs), "load_max": max(r["load_average_1min_after"] for r in rs)}
        if case.startswith("floor"):
            r0 = rs[0]
            row["floor_s"] = round(row["median_s"] * r0["steps"] * r0["windows"], 2)
        if case == "ivan_floor":
            row["floor_s"] = round(row["median_s"] * rs[0]["slices"] / rs[0]["batch"], 2)  # per-slice cost x slices
        if case == "maisi_floor":  # one ControlNet + UNet evaluation per step (the decode has its own cases)
            row["floor_s"] = round(row["median_s"] * rs[0]["steps"], 4)
        if case in ("aldm_floor", "noddi_floor"):
            r0 = rs[0]
            row["once_median_s"] = statistics.median(r["once_s"] for r in rs)
            if case == "aldm_floor":  # a UNet pass per step and target, then the once-per-volume passes
                row["floor_s"] = round(row["median_s"] * r0["steps"] * r0["targets"] + row["once_median_s"], 4)
            else:  # per window: a UNet pass per step plus its encode and decode; windows x that per-window cost
                row["floor_s"] = round(
                    (row["median_s"] * r0["steps"] + row["once_median_s"]) * r0["windows"] / r0["batch"], 4)
        if case.startswith("sampler") or case in FLOOR_OF:
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
        if row["case"].startswith("sampler") or row["case"] in FLOOR_OF:
            floor_case = FLOOR_OF.get(row["case"]) or "floor_" + row["case"].split("_", 1)[1]
            floor = next((f for f in table if f["case"] == floor_case), None)
            if floor and floor["floor_s"] > 0:
                row["ratio_to_floor"] = round(row["median_s"] / floor["floor_s"], 3)
                if "second_call_median_s" in row:
                    row["second_call_ratio_to_floor"] = round(row["second_call_median_s"] / floor["floor_s"], 3)
    return table


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
    ap.add_argument("--aldm-volume", type=int, nargs=3, default=None,
                    help="source volume of the aldm cases (default: the config's roi_size; each side divisible "
                         "by 16 at paper scale: f = 4, two UNet downsamplings)")
    ap.add_argument("--noddi-volume", type=int, nargs=3, default=None,
                    help="LR feature volume of the noddi cases (default: the config's lr_patch, one window)")
    ap.add_argument("--maisi-output", type=int, nargs=3, default=None,
                    help="output size of the maisi_floor / maisi_sampler cases (default: the config's output_size; "
                         "multiples of 32)")
    ap.add_argument("--maisi-version", choices=("rflow", "ddpm"), default="rflow",
                    help="the networks and scheduler of the maisi_floor / maisi_sampler cases")
    ap.add_argument("--sw-batch-size", type=int, default=None,
                    help="windows per network pass of the diffseg sampler and bundle cases (default: the config's)")
    ap.add_argument("--steps", type=int, default=None,
                    help="sampler steps of the aldm, noddi and maisi cases (default: the config's); the loop / floor ratio "
                         "is what matters, and the floor scales with the same steps")
    ap.add_argument("--overlays", nargs="+", default=[],
                    help="config files read over inference.json by the aldm, noddi and maisi cases: names in the bundle's "
                         "configs/ (e.g. light.json; the tests use tiny.json) or paths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:  # child process: one run of one case
        print(json.dumps(run_case(args.case, args.save, args.maisi_latent, args.ivan_volume, args.aldm_volume,
                                  args.noddi_volume, args.steps, args.overlays, args.maisi_output,
                                  args.maisi_version, args.sw_batch_size)))
        return
    runs, saved = [], {}
    work = Path(args.out or "runs/cpu_inference")
    work.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        if case.startswith("maisi_decode_"):
            if case[len("maisi_decode_"):] not in DECODE_MODES:
                raise SystemExit(f"unknown decode mode in case {case!r}; expected maisi_decode_ + one of {DECODE_MODES}")
        elif case not in IVAN_CASES + LDM_CASES and (
                case.split("_", 1)[0] not in ("floor", "sampler", "bundle") or case.split("_", 1)[1] not in LEVERS):
            raise SystemExit(f"unknown case {case!r}; expected floor_/sampler_/bundle_ + one of {LEVERS}, "
                             f"maisi_decode_ + one of {DECODE_MODES}, or one of {IVAN_CASES + LDM_CASES}")
    # the cases take turns (every case once, then again): a machine whose speed drifts over minutes then slows
    # every case alike instead of the cases run last
    for rep in range(args.repeats):
        for case in args.cases:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads),
                   "--maisi-latent", *map(str, args.maisi_latent), "--ivan-volume", *map(str, args.ivan_volume)]
            for flag, value in (("--aldm-volume", args.aldm_volume), ("--noddi-volume", args.noddi_volume),
                                ("--steps", args.steps), ("--overlays", args.overlays),
                                ("--maisi-output", args.maisi_output), ("--maisi-version", args.maisi_version),
                                ("--sw-batch-size", args.sw_batch_size)):
                if value:
                    cmd += [flag, *map(str, value if isinstance(value, list) else [value])]
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
    table = summarise(args.cases, runs)
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
