"""Condition encoder, training steps, latent normalisation, schedules and the DDIM sampling order (spec §9)."""

from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.engines.ema import EMA
from common.engines.noddi_steps import CondEncoderStep, LatentDiffusionStep, LatentNormalizer, NODDISRInferer, NODDISRModel
from common.inferers.latent_diffusion import LatentDiffusionSampler
from common.networks.lr_encoder import CrossEmbedLayer3d, LREncoder
from common.networks.vqgan import VQGAN

SCHED = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=1e-4, beta_end=2e-2, prediction_type="epsilon", clip_sample=False)


def _tiny():
    torch.manual_seed(0)
    vq = VQGAN.cldm("tiny")
    enc = LREncoder(4, 4, hid_channels=8, norm_num_groups=4)
    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=8, out_channels=4, channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8
    )
    vq.train()
    vq(torch.rand(2, 3, 16, 16, 16))  # data-dependent codebook initialisation
    vq.eval()
    return vq, enc, unet


def _engine(it=1):
    return SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=it), amp=False)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_shapes():
    assert [c.out_channels for c in CrossEmbedLayer3d(4, 128).convs] == [64, 32, 16, 16]
    paper = LREncoder(4, 8, hid_channels=128)
    assert paper(torch.rand(1, 4, 8, 8, 8)).shape == (1, 8, 8, 8, 8)  # LR grid = latent grid (32^3 -> 32^3 at scale)
    tiny = LREncoder(6, 4, hid_channels=8, norm_num_groups=4)
    assert tiny(torch.rand(2, 6, 8, 8, 8)).shape == (2, 4, 8, 8, 8)
    vq = VQGAN.cldm("tiny").eval()
    assert vq.encode(torch.rand(2, 3, 16, 16, 16)).shape == (2, 4, 8, 8, 8)


def test_stage2_trains_encoder_only():
    vq, enc, _ = _tiny()
    before_vq, before_enc = _snapshot(vq), _snapshot(enc)
    step = CondEncoderStep(enc, vq, torch.optim.AdamW(enc.parameters(), 1e-3))
    out = step(_engine(), {"image": torch.rand(2, 4, 8, 8, 8), "noddi": torch.rand(2, 3, 16, 16, 16)})
    assert set(out) == {"loss", "loss_l1"} and out["loss"] > 0
    assert _same(before_vq, vq.state_dict()) and not _same(before_enc, enc.state_dict())


def test_stage3_trains_unet_only_and_ema_schedule():
    vq, enc, unet = _tiny()
    norm = LatentNormalizer.from_vqgan(vq)
    ema = EMA(unet, decay=0.995, warmup=False)
    step = LatentDiffusionStep(unet, enc, vq, norm, DDPMScheduler(**SCHED), torch.optim.Adam(unet.parameters(), 1e-3), ema=ema, ema_start=3, ema_every=2)
    before = (_snapshot(vq), _snapshot(enc))
    batch = {"image": torch.rand(2, 4, 8, 8, 8), "noddi": torch.rand(2, 3, 16, 16, 16)}
    ema_states = []
    for it in range(1, 5):
        out = step(_engine(it), batch)
        ema_states.append(_snapshot(ema.module))
    assert set(out) == {"loss", "loss_l1_eps"}
    assert _same(before[0], vq.state_dict()) and _same(before[1], enc.state_dict())
    # iteration 2 (< start): the EMA is a copy of the model; iteration 3: not a multiple of 2, unchanged
    assert _same(ema_states[1], ema_states[2])
    assert int(ema.num_updates) == 1  # iteration 4: the first averaged update


def test_latent_normaliser_round_trip_and_reload(tmp_path):
    vq, _, _ = _tiny()
    norm = LatentNormalizer.from_vqgan(vq)
    mean, std = vq.codebook_mean_std()
    assert float(norm.mean) == pytest.approx(mean) and float(norm.std) == pytest.approx(std)
    z = torch.randn(2, 4, 3, 3, 3)
    torch.testing.assert_close(norm.inverse(norm(z)), z)
    torch.save(norm.state_dict(), tmp_path / "n.pt")
    other = LatentNormalizer()
    other.load_state_dict(torch.load(tmp_path / "n.pt", weights_only=True))
    assert torch.equal(other.mean, norm.mean) and torch.equal(other.std, norm.std)


def test_schedules():
    s = DDPMScheduler(**SCHED)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(7.334e-4, rel=1e-3)
    assert s.clip_sample is False
    d = DDIMScheduler(**SCHED)
    d.set_timesteps(100)
    t = d.timesteps.tolist()
    assert len(t) == 100 and t[0] == 999 and t[-1] == 0 and all(a > b for a, b in zip(t, t[1:]))


def test_sampling_visits_t_in_decreasing_order_and_is_deterministic():
    """Regression test of the official code's reversed DDIM loop (spec §8.1)."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen.append(int(t[0]))
            return torch.zeros_like(x[:, 4:])

    sampler = LatentDiffusionSampler(DDIMScheduler(**SCHED), num_inference_steps=10, eta=0.0, latent_channels=4, timestep_spacing="linspace", progress=False)
    cond, noise = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)
    z1 = sampler(cond, Spy(), noise=noise)
    assert seen == sorted(seen, reverse=True) and seen[0] == 999 and seen[-1] == 0
    z2 = sampler(cond, Spy(), noise=noise)
    assert torch.equal(z1, z2)


def test_model_and_inferer_shapes_and_seed():
    vq, enc, unet = _tiny()
    model = NODDISRModel(vq, enc, unet, LatentNormalizer.from_vqgan(vq)).eval()
    f = torch.rand(1, 4, 6, 10, 10)
    assert model(f[..., :8, :8, :8][:, :, :6]).shape[1] == 3
    sampler = LatentDiffusionSampler(DDIMScheduler(**SCHED), num_inference_steps=2, eta=0.0, latent_channels=4, timestep_spacing="linspace", progress=False)
    inf = NODDISRInferer(roi_size=8, sampler=sampler, seed=5)
    a, b = inf(f, model), inf(f, model)
    assert a.shape == (1, 3, 12, 20, 20) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    c = NODDISRInferer(roi_size=8, sampler=sampler, seed=6)(f, model)
    assert not torch.equal(a, c)
    det = NODDISRInferer(roi_size=8, sampler=None)(f, model)
    assert det.shape == a.shape
