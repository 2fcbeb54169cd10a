"""MS-SPADE, the ALDM diffusion UNet factory, the EMA and the latent sampler (aldm_translation spec §9)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.engines.ema import EMA
from common.inferers import LatentDiffusionSampler, set_sampling_timesteps
from common.networks.aldm_ldm import aldm_diffusion_unet, target_condition
from common.networks.spade import MSSPADEGenerator, SelfSPADE

MODS = ["t1", "t1ce", "t2", "flair"]


def _schedule(cls=DDIMScheduler, **kw):
    kw = {"steps_offset": 1, "set_alpha_to_one": False, **kw} if cls is DDIMScheduler else kw
    return cls(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
               prediction_type="epsilon", clip_sample=False, **kw)


# ----------------------------------------------------------------------------- MS-SPADE
def test_selfspade_uses_relu_and_instance_norm():
    unit = SelfSPADE(3, hidden_channels=8)
    assert [type(m) for m in unit.mlp_shared.adn.children()] == [torch.nn.ReLU]
    # gamma/beta are plain convolutions (MONAI's SPADE instance-normalises their outputs)
    assert len(list(unit.mlp_gamma.children())) == 1 and len(list(unit.mlp_beta.children())) == 1
    assert isinstance(unit.param_free_norm, torch.nn.InstanceNorm3d) and not unit.param_free_norm.affine
    # with zero-initialised modulation convs the unit is exactly the instance norm
    for conv in (unit.mlp_gamma.conv, unit.mlp_beta.conv):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    h = torch.randn(2, 3, 6, 6, 6)
    ref = (h - h.mean((2, 3, 4), keepdim=True)) / torch.sqrt(h.var((2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(unit(h), ref, atol=1e-5, rtol=1e-5)


def test_spade_keeps_shape_and_targets_differ():
    torch.manual_seed(0)
    gen = MSSPADEGenerator(MODS, in_channels=3, nf=8, hidden_channels=8)
    z = torch.randn(2, 3, 8, 8, 6)
    outs = {m: gen(z, m) for m in MODS}
    assert all(o.shape == z.shape for o in outs.values())
    for a in MODS:
        for b in MODS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    # per-sample targets equal single-target calls sample by sample
    mixed = gen(z, ["t2", "flair"])
    torch.testing.assert_close(mixed[0:1], gen(z[0:1], "t2"))
    torch.testing.assert_close(mixed[1:2], gen(z[1:2], "flair"))
    with pytest.raises(KeyError):
        gen(z, "pd")


def test_spade_only_selected_branch_gets_gradients():
    gen = MSSPADEGenerator(MODS, nf=8, hidden_channels=8)
    gen(torch.randn(1, 3, 6, 6, 6), "t2").square().mean().backward()
    for name, p in gen.named_parameters():
        if ".branches." in name:
            branch = name.split(".branches.")[1].split(".")[0]
            nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert nonzero == (branch == "t2"), name


def test_spade_paper_size():
    gen = MSSPADEGenerator(MODS)  # nf 64, hidden 64 (v1)
    assert gen(torch.randn(1, 3, 4, 4, 4), "t1").shape == (1, 3, 4, 4, 4)
    assert len(gen.block_0.norm_0.branches) == 4


# ----------------------------------------------------------------------------- UNet
def test_unet_cross_attention_shapes_and_condition():
    torch.manual_seed(0)
    unet = aldm_diffusion_unet(len(MODS), embed_dim=3, scale="tiny")
    # MONAI zero-initialises the output conv and the attention projections: perturb them so the
    # test can see the effect of the condition
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.05)
    assert unet.conv_in.conv.in_channels == 9 and unet.out[-1].conv.out_channels == 3
    ctx = target_condition(["t2", "flair"], MODS, device="cpu")["context"]
    assert ctx.shape == (2, 1, 4) and torch.equal(ctx.sum(-1), torch.ones(2, 1))
    assert ctx[0, 0, 2] == 1 and ctx[1, 0, 3] == 1
    x, t = torch.randn(2, 9, 8, 8, 8), torch.tensor([10, 500])
    out = unet(x, t, context=ctx)
    assert out.shape == (2, 3, 8, 8, 8)
    other = unet(x, t, context=target_condition(["t1", "t1"], MODS)["context"])
    assert (out - other).abs().max() > 0  # the condition changes the prediction


def test_unet_class_embed_variant():
    unet = aldm_diffusion_unet(len(MODS), scale="tiny", conditioning="class_embed")
    labels = target_condition(["t1", "flair"], MODS, conditioning="class_embed")["class_labels"]
    assert labels.tolist() == [0, 3]
    assert unet(torch.randn(2, 9, 8, 8, 8), torch.tensor([1, 2]), class_labels=labels).shape == (2, 3, 8, 8, 8)


def test_unet_presets():
    # paper-scale sizes of the spec table (MONAI 3D UNet [128, 256, 512], 1 res block: about 136 M)
    n = sum(p.numel() for p in aldm_diffusion_unet(4, scale="paper").parameters())
    assert 130e6 < n < 142e6
    light = aldm_diffusion_unet(4, scale="light")
    assert tuple(light.block_out_channels) == (128, 128, 256)


# ----------------------------------------------------------------------------- EMA
def test_ema_warmup_formula_and_state_dict():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9999)
    expected = net.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        d = ema.update(net)
        assert d == pytest.approx(min(0.9999, (1 + n) / (10 + n)))
        expected = d * expected + (1 - d) * net.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    assert int(ema.num_updates) == 5
    assert ema.current_decay(10**6) == pytest.approx(0.9999)
    # round trip through a state dict (checkpointing) keeps weights and the update count
    other = EMA(torch.nn.Linear(3, 2))
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 5 and torch.equal(other.module.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.parameters())


# ----------------------------------------------------------------------------- schedule and sampler
def test_schedule_values():
    s = _schedule(DDPMScheduler)
    assert float(s.betas[0]) == pytest.approx(0.0015, abs=1e-9)
    assert float(s.betas[-1]) == pytest.approx(0.0195, abs=1e-9)
    assert float(s.alphas_cumprod[999]) == pytest.approx(1.423e-4, rel=1e-3)
    assert float(s.alphas_cumprod[499]) == pytest.approx(0.1158, rel=1e-3)
    assert s.clip_sample is False


def test_ddim_official_timesteps():
    s = _schedule()
    ts = set_sampling_timesteps(s, 200, "leading")
    assert len(ts) == 200 and int(ts[0]) == 996 and int(ts[-1]) == 1
    assert torch.all(ts[:-1] - ts[1:] == 5)
    # the last step goes to alpha_bar_0 (set_alpha_to_one=False)
    assert float(s.final_alpha_cumprod) == pytest.approx(float(s.alphas_cumprod[0]))
    lin = set_sampling_timesteps(s, 200, "linspace")
    assert int(lin[0]) == 999 and int(lin[-1]) == 1


class _EpsNet(torch.nn.Module):
    """A small deterministic epsilon network on the concat input (tests of the sampler loop)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(9, 3, 3, padding=1)
        self.calls = []

    def forward(self, x, t, context=None, class_labels=None):
        self.calls.append((x.shape, int(t[0]), None if context is None else context.clone()))
        return self.conv(x) * 0.1 + (0 if context is None else context.sum())


def test_sampler_seed_eta_steps():
    net = _EpsNet()
    cond = torch.randn(1, 6, 4, 4, 4)
    ctx = target_condition("t2", MODS)["context"]
    sampler = LatentDiffusionSampler(_schedule(), num_inference_steps=5, eta=1.0, latent_channels=3, progress=False)
    a = sampler(cond, net, context=ctx, seed=3)
    b = sampler(cond, net, context=ctx, seed=3)
    c = sampler(cond, net, context=ctx, seed=4)
    assert a.shape == (1, 3, 4, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    # the network saw [cond, z_t] (9 channels), the context, and 5 decreasing timesteps
    assert len(net.calls) == 15 and net.calls[0][0] == (1, 9, 4, 4, 4)
    assert [c[1] for c in net.calls[:5]] == [801, 601, 401, 201, 1]
    assert torch.equal(net.calls[0][2], ctx)
    # eta 0: same z_T gives identical outputs whatever the seed; eta changes the result
    noise = torch.randn(1, 3, 4, 4, 4)
    d0 = sampler(cond, net, context=ctx, noise=noise, eta=0.0, seed=1)
    d1 = sampler(cond, net, context=ctx, noise=noise, eta=0.0, seed=2)
    assert torch.equal(d0, d1)
    assert not torch.equal(d0, sampler(cond, net, context=ctx, noise=noise, eta=1.0, seed=1))
    # configurable number of steps, and DDPM as an option
    net.calls.clear()
    sampler(cond, net, context=ctx, seed=0, num_inference_steps=2)
    assert len(net.calls) == 2
    ddpm = LatentDiffusionSampler(_schedule(DDPMScheduler), num_inference_steps=4, latent_channels=3, progress=False)
    out = ddpm(cond, net, context=ctx, seed=0)
    assert out.shape == (1, 3, 4, 4, 4) and torch.equal(out, ddpm(cond, net, context=ctx, seed=0))
    assert math.isfinite(float(out.abs().max()))
