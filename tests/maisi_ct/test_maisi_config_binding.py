"""What ``configs/inference.json`` asks for is what generation does, observed during real runs of the bundle
(tiny overlay, CPU):

* without the overlay, the networks it builds have the official checkpoints' layouts (meta device, no weights);
* the noise scheduler is built from the config's ``rflow_scheduler`` / ``ddpm_scheduler`` arguments, the inferer
  holds that object, and the timesteps it steps through are the ones those arguments give (a changed argument
  changes them);
* the ``scale_factor`` stored in the diffusion checkpoint (a ``MetaTensor``, as the official trainer saves it) is
  what the VAE decodes with: two checkpoints that differ only in it give latents that differ by exactly that ratio;
* ``decode_num_splits`` splits every VAE decoder convolution into that many pieces along ``dim_split`` of the
  config (seen on the pieces the convolution receives), clamped so a piece keeps >= 3 latent voxels in a
  sliding window (``decode_mode: sliding_window``, the official path; the CPU default ``auto`` decodes by slabs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from common.networks import maisi as M

RFLOW_KEYS = {"num_train_timesteps", "use_discrete_timesteps", "use_timestep_transform", "sample_method", "scale"}
DDPM_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "schedule", "clip_sample"}
TSP_PADDING = 3  # MONAI's MaisiConvolution overlaps neighbouring pieces by 3 voxels (stride 1)


def _config_args(bundle: Path, key: str) -> dict:
    """The arguments ``inference.json`` writes for ``key`` (read with MONAI's parser, unresolved)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return {k: v for k, v in parser[key].items() if not k.startswith("_")}


def _workflow(bundle: Path, ckpt_dir: Path, out_dir: Path, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")],
                        workflow_type="infer", bundle_root=str(bundle), ckpt_dir=str(ckpt_dir), output_dir=str(out_dir),
                        **overrides)
    wf.initialize()
    return wf


def _record_steps(scheduler) -> list[float]:
    """Record the timestep of every ``scheduler.step`` call the inferer makes."""
    seen: list[float] = []
    original = scheduler.step

    def step(model_output, timestep, *args, **kwargs):
        seen.append(float(timestep))
        return original(model_output, timestep, *args, **kwargs)

    scheduler.step = step
    return seen


def _rflow_timesteps(n_steps: int, latent_numel: int, n_train: int = 1000, base_numel: int = 32**3, dim: int = 3) -> list[float]:
    """Rectified-flow inference timesteps with the resolution-dependent shift (Open-Sora 1.2 ``timestep_transform``,
    which MONAI's RFlowScheduler and the official MAISI sampler use): evenly spaced t in (0, 1] moved to
    ``r t / (1 + (r - 1) t)`` with ``r = (numel / 32^3)^(1/3)`` (transform scale 1)."""
    r = (latent_numel / base_numel) ** (1.0 / dim)
    ts = [1.0 - i / n_steps for i in range(n_steps)]
    return [n_train * r * t / (1 + (r - 1) * t) for t in ts]


# --- networks -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["rflow", "ddpm"])
def test_networks_of_inference_json_have_the_official_layouts(maisi_bundle, version):
    """Without the tiny overlay, every network inference.json builds has exactly the state-dict keys and shapes of
    the official checkpoints (``official_state_dict_layout.json``), attention with 32 channels per head, and the
    VAE splits as the official config does (4 pieces along dim_split 1). Built on the meta device (no weights)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution
    from monai.networks.blocks.selfattention import SABlock

    layout = json.loads((Path(__file__).parent / "official_state_dict_layout.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(maisi_bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(maisi_bundle), "version": version, "device": "$torch.device('cpu')",
                   "controllable_anatomy_size": [["liver", 0.5]]})  # enables the mask-generation networks
    nets = {"autoencoder_def": "autoencoder", "diffusion_unet_def": f"diffusion_unet_{version}",
            "controlnet_def": f"controlnet_{version}", "mask_autoencoder_def": "mask_autoencoder",
            "mask_diffusion_def": "mask_diffusion_unet"}
    for key, official in nets.items():
        with torch.device("meta"):
            net = parser.get_parsed_content(key)
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == layout[official], key
        heads = [m for m in net.modules() if isinstance(m, SABlock)]
        assert all(m.dim_head == 32 for m in heads), key
        if key in ("diffusion_unet_def", "controlnet_def"):
            assert heads
        if key == "autoencoder_def":
            convs = [m for m in net.modules() if isinstance(m, MaisiConvolution)]
            assert convs and {(m.num_splits, m.dim_split) for m in convs} == {(4, 1)}


# --- scheduler --------------------------------------------------------------------------------------------------

def test_rflow_scheduler_arguments_from_inference_json_drive_sampling(maisi_bundle, tiny_ckpt_dir, maisi_masks, tmp_path):
    args = _config_args(maisi_bundle, "rflow_scheduler")
    assert set(args) == RFLOW_KEYS  # a new argument in the config must be checked here too
    wf = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", label_path=str(maisi_masks["grid"]), quality_check=False)
    inferer = wf.parser.get_parsed_content("inferer")
    sched = inferer.scheduler
    assert sched is wf.parser.get_parsed_content("rflow_scheduler") and isinstance(sched, RFlowScheduler)
    for key in RFLOW_KEYS - {"scale"}:
        assert getattr(sched, key) == args[key], key
    # the official config's "scale": 1.4 is the logit-normal scale of training-time sampling; with "uniform" it is
    # unused, and the inference shift uses transform_scale (default 1), as in the official sampler
    assert args["sample_method"] == "uniform" and not hasattr(sched, "distribution") and sched.transform_scale == 1.0
    # the official grid: 256x256x128 at 30 steps (latent 64x64x32)
    steps = wf.parser.get_parsed_content("num_inference_steps")
    full = ConfigParser()
    full.read_config(str(maisi_bundle / "configs" / "inference.json"))
    assert full.get_parsed_content("num_inference_steps") == 30 and steps == 2  # tiny overlay: 2 steps
    sched.set_timesteps(30, input_img_size_numel=64 * 64 * 32)
    assert np.allclose(sched.timesteps.float().numpy(), _rflow_timesteps(30, 64 * 64 * 32), atol=0.5)

    # during a run: as many steps as configured, on the shifted timesteps of the 16^3 latent
    seen = _record_steps(sched)
    wf.run()
    assert len(seen) == steps and np.allclose(seen, _rflow_timesteps(steps, 16**3), atol=0.5)
    assert seen[1] == pytest.approx(333.3, abs=0.5)  # not the unshifted 500

    # bound to the config: switching the shift off there changes the timesteps the sampler uses
    wf = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out2", label_path=str(maisi_masks["grid"]),
                   quality_check=False, **{"rflow_scheduler#use_timestep_transform": False})
    seen = _record_steps(wf.parser.get_parsed_content("inferer").scheduler)
    wf.run()
    assert seen == [1000.0, 500.0]


def _ddpm_files(wf_parser: ConfigParser) -> None:
    """Tiny DDPM networks under the file names the config reads (official layouts, plain scale factor)."""
    torch.manual_seed(3)
    torch.save(M.maisi_autoencoder(tiny=True, device="cpu").state_dict(), wf_parser.get_parsed_content("autoencoder_path"))
    torch.save({"unet_state_dict": M.maisi_diffusion_unet("ddpm", tiny=True, device="cpu").state_dict(),
                "scale_factor": torch.tensor(0.9)}, wf_parser.get_parsed_content("diffusion_unet_path"))
    torch.save({"controlnet_state_dict": M.maisi_controlnet("ddpm", tiny=True, device="cpu").state_dict()},
               wf_parser.get_parsed_content("controlnet_path"))


def test_ddpm_scheduler_arguments_from_inference_json_drive_sampling(maisi_bundle, maisi_masks, tmp_path):
    args = _config_args(maisi_bundle, "ddpm_scheduler")
    assert set(args) == DDPM_KEYS
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    wf = _workflow(maisi_bundle, ckpt, tmp_path / "out", version="ddpm", label_path=str(maisi_masks["grid"]),
                   quality_check=False)
    _ddpm_files(wf.parser)
    inferer = wf.parser.get_parsed_content("inferer")
    sched = inferer.scheduler
    assert sched is wf.parser.get_parsed_content("ddpm_scheduler") and isinstance(sched, DDPMScheduler)
    assert sched.num_train_timesteps == args["num_train_timesteps"] and sched.clip_sample is args["clip_sample"] is False
    # "scaled_linear_beta" from beta_start to beta_end: sqrt(beta) linear over the training steps
    expected = torch.linspace(args["beta_start"] ** 0.5, args["beta_end"] ** 0.5, args["num_train_timesteps"]) ** 2
    assert args["schedule"] == "scaled_linear_beta" and torch.allclose(sched.betas, expected)
    assert not torch.allclose(sched.betas, torch.linspace(args["beta_start"], args["beta_end"], 1000))  # not linear
    full = ConfigParser()
    full.read_config(str(maisi_bundle / "configs" / "inference.json"))
    full["version"] = "ddpm"
    assert full.get_parsed_content("num_inference_steps") == 1000

    seen = _record_steps(sched)
    wf.run()
    assert seen == [999.0, 0.0]  # the tiny overlay's 2 steps over the 1000 training steps
    assert inferer.scale_factor == pytest.approx(0.9)

    # bound to the config: another beta_end there is the scheduler the inferer samples with
    wf = _workflow(maisi_bundle, ckpt, tmp_path / "out2", version="ddpm", label_path=str(maisi_masks["grid"]),
                   **{"ddpm_scheduler#beta_end": 0.03})
    assert float(wf.parser.get_parsed_content("inferer").scheduler.betas[-1]) == pytest.approx(0.03)


# --- scale factor -------------------------------------------------------------------------------------------------

def _ckpt_dir_with_scale(src: Path, dst: Path, scale: float) -> Path:
    """``src``'s tiny rflow files, the UNet file re-saved with ``scale_factor`` a MetaTensor (official trainer)."""
    from monai.data import MetaTensor

    dst.mkdir()
    for name in ("autoencoder_v1.pt", "controlnet_3d_rflow-ct.pt"):
        shutil.copy(src / name, dst / name)
    ckpt = torch.load(src / "diff_unet_3d_rflow-ct.pt", weights_only=True)
    ckpt["scale_factor"] = MetaTensor(torch.tensor(scale), meta={"filename_or_obj": "case_emb.nii.gz"})
    torch.save(ckpt, dst / "diff_unet_3d_rflow-ct.pt")
    return dst


def _run_recording_decode(bundle, ckpt_dir, out_dir, mask, monkeypatch, **overrides) -> tuple[list[torch.Tensor], object]:
    """Run inference, recording every latent the VAE decodes, on either decode path (streaming is the CPU default)."""
    import common.inferers.maisi as MI

    wf = _workflow(bundle, ckpt_dir, out_dir, label_path=str(mask), quality_check=False, **overrides)
    inferer = wf.parser.get_parsed_content("inferer")
    vae = inferer.autoencoder
    assert vae is wf.parser.get_parsed_content("autoencoder")
    seen: list[torch.Tensor] = []
    stream = MI.streaming_decode
    monkeypatch.setattr(MI, "streaming_decode", lambda ae, z, **kw: (seen.append(z.detach().clone()), stream(ae, z, **kw))[1])
    original = vae.decode_stage_2_outputs
    vae.decode_stage_2_outputs = lambda z: (seen.append(z.detach().clone()), original(z))[1]
    wf.run()
    return seen, inferer


def test_checkpoint_scale_factor_is_what_the_vae_decodes_with(maisi_bundle, tiny_ckpt_dir, maisi_masks, tmp_path, monkeypatch):
    decoded, images = {}, {}
    for scale in (1.25, 0.5):
        ckpt = _ckpt_dir_with_scale(tiny_ckpt_dir, tmp_path / f"models_{scale}", scale)
        out = tmp_path / f"out_{scale}"
        seen, inferer = _run_recording_decode(maisi_bundle, ckpt, out, maisi_masks["grid"], monkeypatch)
        assert inferer.scale_factor == pytest.approx(scale) and len(seen) == 1  # one sample, one whole-volume decode
        decoded[scale] = seen[0]
        images[scale] = np.asarray(nib.load(str(next(out.glob("sample_*_image.nii.gz")))).dataobj)
    # same seed and weights: the same sampled latent, divided by each checkpoint's own factor before decoding
    assert torch.allclose(decoded[1.25] * 1.25, decoded[0.5] * 0.5, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(decoded[1.25], decoded[0.5], atol=1e-3)
    assert np.abs(images[1.25] - images[0.5]).max() > 1.0  # HU


# --- tensor splitting ---------------------------------------------------------------------------------------------

def _record_splits(vae: torch.nn.Module) -> list[dict]:
    """For every MaisiConvolution call of the decoder: the input shape and the shapes its convolution ran on."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    calls: list[dict] = []
    for module in vae.decoder.modules():
        if isinstance(module, MaisiConvolution):
            module.register_forward_pre_hook(lambda m, inp: calls.append({"in": tuple(inp[0].shape), "pieces": []}))
            module.conv.register_forward_pre_hook(lambda m, inp: calls[-1]["pieces"].append(tuple(inp[0].shape)))
    return calls


def _assert_split(calls: list[dict], n: int, axis: int) -> None:
    assert calls
    for call in calls:
        pieces = call["pieces"]
        assert len(pieces) == n, call
        for piece in pieces:  # cut along the split axis only
            assert [s for i, s in enumerate(piece) if i != axis] == [s for i, s in enumerate(call["in"]) if i != axis]
        length = call["in"][axis]
        if n == 1:
            assert pieces[0] == call["in"]
        else:  # n thinner pieces covering the axis, neighbours overlapping by the padding on each side
            assert all(p[axis] < length for p in pieces)
            assert sum(p[axis] for p in pieces) == length + 2 * TSP_PADDING * (n - 1)


def test_decode_num_splits_splits_every_decoder_convolution(maisi_bundle, tiny_ckpt_dir, maisi_masks, tmp_path):
    axis = 2 + _config_args(maisi_bundle, "autoencoder_def")["dim_split"]  # dim_split 1: the y axis of (N, C, x, y, z)
    images = {}
    for n in (1, 4):
        wf = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / f"out{n}", label_path=str(maisi_masks["grid"]),
                       quality_check=False, decode_num_splits=n, decode_mode="sliding_window")
        calls = _record_splits(wf.parser.get_parsed_content("autoencoder"))
        wf.run()
        _assert_split(calls, n, axis)
        assert calls[0]["in"][2:] == (16, 16, 16)  # whole-volume decode of the 16^3 latent
        images[n] = np.asarray(nib.load(str(next((tmp_path / f"out{n}").glob("sample_*_image.nii.gz")))).dataobj)
    assert np.allclose(images[1], images[4], atol=0.05)  # splitting saves memory, it does not change the image


def test_splits_clamped_in_a_thin_sliding_window(maisi_bundle, tiny_ckpt_dir, maisi_masks, tmp_path):
    """An 8^3 latent window leaves 8 voxels along y: 4 splits would be 2 voxels thin, so 2 are used."""
    axis = 2 + _config_args(maisi_bundle, "autoencoder_def")["dim_split"]
    wf = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", label_path=str(maisi_masks["grid"]), quality_check=False,
                   decode_num_splits=4, decode_roi_size=[8, 8, 8], decode_overlap=0.5, decode_mode="sliding_window")
    calls = _record_splits(wf.parser.get_parsed_content("autoencoder"))
    wf.run()
    assert M.clamp_num_splits(4, 8) == 2
    _assert_split(calls, 2, axis)
    first = [c for c in calls if c["in"][1] == 4]  # the decoder's first convolution, on the 4-channel latent window
    assert len(first) == 27 and all(c["in"][2:] == (8, 8, 8) for c in first)  # 3 windows per axis at overlap 0.5
