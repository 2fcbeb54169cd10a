"""Full-size MAISI networks: official state-dict layout, parameter counts, CPU switches, checkpoint loading.

``official_state_dict_layout.json`` lists every state-dict key and shape of the seven official networks,
generated from the hyper-parameters of NV-Generate-CTMR ``configs/config_maisi3d-rflow.json`` /
``config_maisi3d-ddpm.json`` (MONAI 1.6.1). No forward pass of a full-size network is run here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.networks import maisi as M

LAYOUT = json.loads((Path(__file__).parent / "official_state_dict_layout.json").read_text())

# parameter counts measured on the official networks (spec maisi_ct section 2)
OFFICIAL = {
    "autoencoder": (lambda: M.maisi_autoencoder(device="cpu"), 20_944_897, 130),
    "diffusion_unet_rflow": (lambda: M.maisi_diffusion_unet("rflow", device="cpu"), 180_500_868, 435),
    "diffusion_unet_ddpm": (lambda: M.maisi_diffusion_unet("ddpm", device="cpu"), 169_370_884, 372),
    "controlnet_rflow": (lambda: M.maisi_controlnet("rflow", device="cpu"), 72_037_072, 231),
    "controlnet_ddpm": (lambda: M.maisi_controlnet("ddpm", device="cpu"), 68_644_944, None),
    "mask_autoencoder": (lambda: M.maisi_mask_autoencoder(device="cpu"), 5_256_509, None),
    "mask_diffusion_unet": (lambda: M.maisi_mask_diffusion(device="cpu"), 197_163_012, None),
}


def _fake_checkpoint(layout: dict) -> dict[str, torch.Tensor]:
    # constant tensors (no memory blow-up from random init) with exactly the official names and shapes
    return {k: torch.full(shape, 0.5) if shape else torch.tensor(0.5) for k, shape in layout.items()}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_full_size_layout_matches_official(name):
    build, n_params, n_keys = OFFICIAL[name]
    layout = LAYOUT[name]
    # the reference file itself carries the published parameter count (independent of our factories)
    assert sum(math.prod(s) for k, s in layout.items() if "num_batches_tracked" not in k) >= n_params
    net = build()
    state = net.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == layout
    assert sum(p.numel() for p in net.parameters()) == n_params
    if n_keys is not None:
        assert len(state) == n_keys
    missing, unexpected = net.load_state_dict(_fake_checkpoint(layout), strict=True)
    assert not missing and not unexpected
    assert float(next(iter(net.state_dict().values())).flatten()[0]) == 0.5


def test_controlnet_copies_180_of_231_unet_tensors():
    unet = M.maisi_diffusion_unet("rflow", device="cpu")
    cn = M.maisi_controlnet("rflow", device="cpu")
    assert M.init_controlnet_from_unet(cn, unet) == 180
    assert torch.equal(cn.conv_in.conv.weight, unet.conv_in.conv.weight)


def test_cpu_switches_are_automatic_and_change_no_key():
    official = {**M.UNET_RFLOW_ARGS, **M.AUTOENCODER_ARGS}
    assert official["use_flash_attention"] and official["norm_float16"]
    off = M.cpu_switches(official, "cpu")
    assert off["use_flash_attention"] is False and off["norm_float16"] is False
    if not torch.cuda.is_available():
        assert M.cpu_switches(official, "cuda")["use_flash_attention"] is False  # no CUDA: a CUDA request falls back
    # the flags are layout-neutral: the same keys with and without them
    a = M.maisi_autoencoder(tiny=True, device="cpu", norm_float16=False).state_dict().keys()
    b = M.maisi_autoencoder(tiny=True, device="cpu").state_dict().keys()
    assert list(a) == list(b)


def test_official_flags_fail_on_cpu_and_factory_runs():
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    if not torch.cuda.is_available():  # the failure the switches avoid exists only without CUDA
        with pytest.raises(ValueError):
            DiffusionModelUNetMaisi(**{**M.UNET_RFLOW_ARGS, **M.TINY_UNET_ARGS})  # flash attention
    unet = M.maisi_diffusion_unet(tiny=True, device="cpu").eval()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        out = unet(x, torch.tensor([500.0]), class_labels=torch.tensor([1]), spacing_tensor=torch.tensor([[150.0, 150.0, 150.0]]))
    assert out.shape == x.shape and out.dtype == torch.float32
    vae = M.maisi_autoencoder(tiny=True, device="cpu", num_splits=1).eval()
    with torch.no_grad():
        img = vae.decode_stage_2_outputs(torch.randn(1, 4, 8, 8, 8))
    assert img.shape == (1, 1, 32, 32, 32) and img.dtype == torch.float32


def test_load_official_checkpoint_layouts(tmp_path):
    unet = M.maisi_diffusion_unet(tiny=True, device="cpu")
    cn = M.maisi_controlnet(tiny=True, device="cpu")
    vae = M.maisi_autoencoder(tiny=True, device="cpu")
    torch.save({"epoch": 3, "loss": 0.1, "num_train_timesteps": 1000, "scale_factor": torch.tensor(1.0055984),
                "unet_state_dict": unet.state_dict()}, tmp_path / "unet.pt")
    torch.save({"epoch": 3, "loss": 0.1, "controlnet_state_dict": cn.state_dict()}, tmp_path / "cn.pt")
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    state, scale = M.load_maisi_checkpoint(tmp_path / "unet.pt", "unet")
    assert scale.item() == pytest.approx(1.0055984) and state.keys() == unet.state_dict().keys()
    assert M.read_scale_factor(tmp_path / "unet.pt") == pytest.approx(1.0055984)
    assert M.load_maisi_checkpoint(tmp_path / "vae.pt", "autoencoder")[1] is None
    # ControlNet load order: UNet copy first, then the strict ControlNet load wins
    fresh = M.maisi_controlnet(tiny=True, device="cpu")
    M.load_pretrained(fresh, tmp_path / "cn.pt", "controlnet", init_from=unet)
    assert torch.equal(fresh.conv_in.conv.weight, cn.conv_in.conv.weight)
    with pytest.raises(FileNotFoundError, match="large_files.yml"):
        M.load_pretrained(vae, tmp_path / "missing.pt", "autoencoder")


def test_clamp_num_splits():
    assert M.clamp_num_splits(4, 8) == 2  # 8 latent voxels: 4 splits would leave 2 per split
    assert M.clamp_num_splits(4, 16) == 4
    assert M.clamp_num_splits(16, 4) == 1
