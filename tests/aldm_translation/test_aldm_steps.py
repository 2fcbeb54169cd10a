"""ALDM stage-2 (MS-SPADE) and stage-3 (latent diffusion) training steps on real avg152 images."""

from __future__ import annotations

import math
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from common.data.fetch import demo_file
from common.engines.aldm_steps import LatentDiffusionTrainingStep, SPADETrainingStep, sample_pair
from common.engines.ema import EMA
from common.networks.aldm_ldm import aldm_diffusion_unet
from common.networks.discriminators import aldm_discriminator
from common.networks.spade import MSSPADEGenerator
from common.networks.vqgan import VQGAN

MODS = ["t1", "t2", "pd"]


@pytest.fixture(scope="module")
def batch():
    """The real ICBM-152 T1/T2/PD triple, centre 32^3 crop, scaled to [0, 1]: (1, 1, 32, 32, 32) each."""
    out = {}
    for m, name in zip(MODS, ("avg152T1", "avg152T2", "avg152PD")):
        vol = np.asarray(nib.load(demo_file(f"spm/{name}.nii")).get_fdata(), dtype=np.float32)
        c = [s // 2 for s in vol.shape]
        crop = vol[c[0] - 16 : c[0] + 16, c[1] - 16 : c[1] + 16, c[2] - 16 : c[2] + 16]
        crop = np.clip(crop / np.percentile(vol, 99.5), 0, 1)
        out[m] = torch.from_numpy(crop)[None, None]
    return out


def _engine(iteration=1):
    return SimpleNamespace(state=SimpleNamespace(iteration=iteration, device=torch.device("cpu")), amp=False, scaler=None)


def _stage2(cycle_weight=1.0, cycle_space="latent"):
    torch.manual_seed(0)
    ae = VQGAN.aldm("tiny")
    spade = MSSPADEGenerator(MODS, nf=8, hidden_channels=8)
    disc = aldm_discriminator(in_channels=3, channels=8, num_layers_d=1, norm_num_groups=4)
    step = SPADETrainingStep(
        ae, spade, disc,
        torch.optim.Adam(spade.parameters(), lr=1e-3, betas=(0.5, 0.9)),
        torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9)),
        MODS, cycle_weight=cycle_weight, cycle_space=cycle_space,
    )
    return ae, spade, disc, step


def test_sample_pair():
    torch.manual_seed(0)
    pairs = [sample_pair(MODS, allow_identity=False) for _ in range(300)]
    assert all(s != t for s, t in pairs)
    assert len(set(pairs)) == 6  # every ordered pair appears
    torch.manual_seed(0)
    assert any(s == t for s, t in (sample_pair(MODS, allow_identity=True) for _ in range(100)))


def test_stage2_frozen_autoencoder_bit_identical(batch):
    ae, spade, disc, step = _stage2()
    ae_before = {k: v.clone() for k, v in ae.state_dict().items()}
    spade_before = {k: v.clone() for k, v in spade.state_dict().items()}
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    for it in (1, 2):
        out = step(_engine(it), batch)
    assert all(torch.equal(ae_before[k], v) for k, v in ae.state_dict().items())
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    assert any(not torch.equal(spade_before[k], v) for k, v in spade.state_dict().items())
    assert any(not torch.equal(disc_before[k], v) for k, v in disc.state_dict().items())
    for key in ("loss", "l1_latent", "adv_latent", "cycle", "loss_d"):
        assert key in out and math.isfinite(out[key]), key
    assert out["l1_latent"] > 0 and out["cycle"] > 0


def test_stage2_cycle_options(batch):
    *_, step = _stage2(cycle_weight=0.0)
    out = step(_engine(), batch)
    assert "cycle" not in out and {"l1_latent", "adv_latent"} <= set(out)
    ae, *_, step = _stage2(cycle_space="image")
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    out = step(_engine(), batch)
    assert out["cycle"] > 0 and math.isfinite(out["cycle"])
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())


def test_stage2_generator_step_leaves_discriminator_alone(batch):
    """Before disc_start the discriminator is neither run nor updated; the generator still learns."""
    torch.manual_seed(0)
    ae, spade, disc, _ = _stage2()
    step = SPADETrainingStep(ae, spade, disc, torch.optim.Adam(spade.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3),
                             MODS, disc_start=5)
    d_before = {k: v.clone() for k, v in disc.state_dict().items()}
    out = step(_engine(1), batch)
    assert out["loss_d"] == 0.0
    assert all(torch.equal(d_before[k], v) for k, v in disc.state_dict().items())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc.parameters())


def test_stage3_step_loss_ema_and_scale(batch):
    torch.manual_seed(0)
    ae = VQGAN.aldm("tiny")
    spade = MSSPADEGenerator(MODS, nf=8, hidden_channels=8)
    unet = aldm_diffusion_unet(len(MODS), scale="tiny")
    ema = EMA(unet)
    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    step = LatentDiffusionTrainingStep(ae, spade, unet, torch.optim.AdamW(unet.parameters(), lr=1e-3), sched, MODS,
                                       ema=ema, scale_factor="auto")
    frozen = {k: v.clone() for k, v in {**ae.state_dict(), **{"s." + k: v for k, v in spade.state_dict().items()}}.items()}
    outs = [step(_engine(i), batch) for i in (1, 2)]
    assert all("loss" in o and math.isfinite(o["loss"]) and o["loss"] == o["mse"] for o in outs)
    assert outs[0]["ema_decay"] == pytest.approx(2 / 11) and outs[1]["ema_decay"] == pytest.approx(3 / 12)
    # EMA differs from the raw weights after the updates
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(ema.module.parameters(), unet.parameters()))
    assert diff > 0
    after = {**ae.state_dict(), **{"s." + k: v for k, v in spade.state_dict().items()}}
    assert all(torch.equal(frozen[k], v) for k, v in after.items())
    # auto scale factor = 1/std of the first target latent, kept in the step's state dict
    sf = step.state_dict()["scale_factor"]
    assert float(sf) > 0 and math.isfinite(float(sf))
    other = LatentDiffusionTrainingStep(ae, spade, unet, torch.optim.AdamW(unet.parameters()), sched, MODS, scale_factor="auto")
    other.load_state_dict(step.state_dict())
    assert other.scale_factor == pytest.approx(float(sf))
