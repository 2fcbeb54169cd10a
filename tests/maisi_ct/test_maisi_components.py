"""MAISI schedulers, label encoding, request checks, quality check, decode paths, sampler conditioning, loss weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from common.engines.maisi_steps import LatentScale, label_weight_map, weighted_l1
from common.inferers.maisi import MaisiInferer, check_input
from common.networks.maisi import maisi_autoencoder, maisi_controlnet, maisi_diffusion_unet
from common.transforms.maisi import (
    BODY_LABEL,
    MAISI_LABELS,
    binarize_labels,
    maisi_name_from_totalsegmentator,
    quality_check,
    totalsegmentator_to_maisi_lut,
)


def rflow():
    # official arguments (NV-Generate-CTMR config_maisi3d-rflow.json "noise_scheduler")
    return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                          sample_method="uniform", scale=1.4)


@pytest.mark.parametrize(
    "numel, head, last",
    [(64 * 64 * 32, [1000, 978.5, 957, 934.5], 51.9), (32**3, [1000, 966.5, 933.5], 33.3), (128**3, [1000, 991.5, 982.5], 121.2)],
)
def test_rflow_timesteps(numel, head, last):
    s = rflow()
    s.set_timesteps(30, input_img_size_numel=numel)
    t = s.timesteps.float()
    assert len(t) == 30 and s.timesteps.dtype == torch.float16
    assert torch.allclose(t[: len(head)], torch.tensor(head, dtype=torch.float32), atol=0.5)
    assert float(t[-1]) == pytest.approx(last, abs=0.1)


def test_rflow_add_noise_and_euler_step():
    s = rflow()
    x0, eps = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    assert torch.allclose(s.add_noise(x0, eps, torch.tensor([0.0])), x0)
    assert torch.allclose(s.add_noise(x0, eps, torch.tensor([1000.0])), eps)
    s.set_timesteps(30, input_img_size_numel=4**3)
    t, t_next = 700.0, 400.0
    x_t = s.add_noise(x0, eps, torch.tensor([t]))
    x_next, _ = s.step(x0 - eps, t, x_t, t_next)  # exact velocity: stays on the straight line
    assert torch.allclose(x_next, s.add_noise(x0, eps, torch.tensor([t_next])), atol=1e-5)


def test_ddpm_option_betas():
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta", clip_sample=False)
    assert float(s.betas[0]) == pytest.approx(0.0015, rel=1e-5)
    assert float(s.betas[999]) == pytest.approx(0.0195, rel=1e-5)
    assert s.clip_sample is False


def test_binarize_labels():
    lab = torch.tensor([0, 1, 200, 132], dtype=torch.uint8).reshape(1, 1, 4, 1, 1)
    b = binarize_labels(lab)
    assert b.shape == (1, 8, 4, 1, 1)
    assert set(torch.unique(b).tolist()) <= {0.0, 1.0}
    assert b[0, :, 2, 0, 0].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    assert b[0, :, 1, 0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(sum(b[:, k] * 2**k for k in range(8)).long(), lab[:, 0].long())
    with pytest.raises(ValueError):
        binarize_labels(torch.tensor([256]).reshape(1, 1, 1, 1, 1))


def test_totalsegmentator_names_map_to_maisi():
    assert maisi_name_from_totalsegmentator("kidney_left") == "left kidney"
    assert maisi_name_from_totalsegmentator("rib_right_12") == "right rib 12"
    assert maisi_name_from_totalsegmentator("lung_middle_lobe_right") == "right lung middle lobe"
    assert maisi_name_from_totalsegmentator("urinary_bladder") == "bladder"
    from common.data.demo import total_class_names

    names = total_class_names()
    lut = totalsegmentator_to_maisi_lut(names)
    assert lut[5] == MAISI_LABELS["liver"] and lut[27] == MAISI_LABELS["vertebrae L5"]
    assert all(lut[i] > 0 for i in names)  # all 117 TotalSegmentator v2 classes have a MAISI id
    assert len(MAISI_LABELS) == 132 and MAISI_LABELS["airway"] == 132 and BODY_LABEL == 200


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_size": [256, 384, 256]}, "equal"),
        ({"spacing": [1.5, 1.0, 2.0]}, r"spacing\[0\] and spacing\[1\] must be equal"),
        ({"output_size": [128, 128, 128]}, "not supported"),
        ({"spacing": [0.4, 0.4, 2.0]}, "spacing"),
        ({"spacing": [6.0, 6.0, 2.0]}, "spacing"),
        ({"output_size": [256, 256, 256], "spacing": [0.8, 0.8, 1.0]}, "field of view"),
        ({"controllable_anatomy_size": [["liver", 0.5]] * 11}, "at most 10"),
        ({"anatomy_list": ["hepatic tumor", "bone lesion"]}, "one tumour"),
        ({"anatomy_list": ["unicorn"]}, "unknown anatomy"),
        ({"output_size": [250, 250, 256], "strict": False}, "multiple of 32"),
        ({"controllable_anatomy_size": [["liver", 1.5]]}, "in \\[0, 1\\]"),
    ],
)
def test_check_input_rejects(kwargs, match):
    req = {"output_size": [256, 256, 256], "spacing": [1.5, 1.5, 2.0]}
    req.update(kwargs)
    with pytest.raises(ValueError, match=match):
        check_input(**req)


def test_check_input_accepts_default_and_relaxed():
    check_input([256, 256, 256], [1.5, 1.5, 2.0], ["liver"], [["liver", 0.5]], ["abdomen"])
    check_input([64, 64, 64], [1.5, 1.5, 1.5], strict=False)


def test_quality_check_liver_median():
    stats = {"liver": {"sigma_6_low": -21.6, "sigma_6_high": 156.3, "percentile_0_5": 9.53, "percentile_99_5": 162.0}}
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = MAISI_LABELS["liver"]
    assert quality_check(np.where(label > 0, 60.0, -1000.0), label, stats)["liver"]["passed"]
    res = quality_check(np.where(label > 0, 500.0, -1000.0), label, stats)["liver"]
    assert not res["passed"] and res["median"] == 500.0


def test_tsp_decode_splits_agree_and_sliding_window_shape():
    torch.manual_seed(0)
    vae = maisi_autoencoder(tiny=True, device="cpu").eval()
    z = torch.randn(1, 4, 16, 16, 16)
    s = rflow()
    outs = []
    for splits in (1, 2, 4):
        inf = MaisiInferer(s, vae, None, decode_roi_size=(16, 16, 16), decode_num_splits=splits, progress=False,
                           decode_mode="sliding_window")
        outs.append(inf.decode(z))  # direct path: latent numel == prod(ROI)
    assert outs[0].shape == (1, 1, 64, 64, 64)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4 and float((outs[0] - outs[2]).abs().max()) < 1e-4
    sw = MaisiInferer(s, vae, None, decode_roi_size=(16, 16, 8), decode_overlap=0.25, decode_num_splits=1, progress=False,
                      decode_mode="sliding_window")
    z2 = torch.randn(1, 4, 16, 16, 12)
    assert sw.decode(z2).shape == (1, 1, 64, 64, 48)  # sliding window on the latent: output = 4x latent


class _Recorder(torch.nn.Module):
    """Wraps the UNet and records the conditioning the sampler passes."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.in_channels = unet.in_channels
        self.calls = []

    def forward(self, **kw):
        self.calls.append({k: v for k, v in kw.items() if k in ("spacing_tensor", "class_labels", "timesteps")})
        return self.unet(**kw)


def test_sampler_conditions_geometry_and_determinism():
    torch.manual_seed(0)
    vae = maisi_autoencoder(tiny=True, device="cpu", num_splits=1).eval()
    unet = _Recorder(maisi_diffusion_unet(tiny=True, device="cpu").eval())
    cn = maisi_controlnet(tiny=True, device="cpu").eval()
    mask = torch.zeros(1, 1, 32, 32, 32, dtype=torch.uint8)
    mask[:, :, 4:28, 4:28, 4:28] = BODY_LABEL
    mask[:, :, 10:20, 10:20, 10:20] = MAISI_LABELS["liver"]
    affine = torch.tensor([[1.5, 0, 0, -10.0], [0, 1.5, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]], dtype=torch.float64)
    mt = MetaTensor(mask, affine=affine)

    def sample():
        inf = MaisiInferer(rflow(), vae, cn, scale_factor=1.3, num_inference_steps=2, decode_num_splits=1, seed=7, progress=False)
        return inf(mt, unet)

    a, b = sample(), sample()
    assert torch.equal(a, b)  # same seed, bit-identical on the CPU
    assert a.shape == mask.shape and torch.allclose(a.affine.double(), affine)
    assert float(a.min()) >= -1000 and float(a.max()) <= 1000
    assert bool((a[mask == 0] == -1000).all())
    call = unet.calls[0]
    assert torch.allclose(call["spacing_tensor"], torch.tensor([[150.0, 150.0, 200.0]]))  # mm x 100
    assert call["class_labels"].tolist() == [1]  # CT
    assert float(call["timesteps"][0]) == 1000.0
    with pytest.raises(ValueError, match="multiple of 32"):
        MaisiInferer(rflow(), vae, cn, progress=False)(MetaTensor(mask[..., :20]), unet)


def test_controlnet_loss_weight_on_labelled_voxels_only():
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.uint8)
    label[:, :, :8] = 23  # lung tumour in the first half along x
    w = label_weight_map(label, (4, 4, 4), [23], 100.0)
    assert w.shape == (1, 1, 4, 4, 4)
    assert bool((w[:, :, :2] == 100).all()) and bool((w[:, :, 2:] == 1).all())
    pred, target = torch.ones(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4)
    assert float(weighted_l1(pred, target, w)) == pytest.approx((100 * 32 + 32) / 64)


def test_latent_scale_from_first_batch():
    s = LatentScale()
    assert not s.initialised
    x = torch.randn(2, 4, 8, 8, 8) * 3
    s.init_from(x)
    assert float(s.value) == pytest.approx(1 / float(x.std()), rel=1e-5)
    assert set(s.state_dict()) == {"value"}


def test_ddpm_option_samples_with_body_region():
    torch.manual_seed(0)
    vae = maisi_autoencoder(tiny=True, device="cpu", num_splits=1).eval()
    unet = maisi_diffusion_unet("ddpm", tiny=True, device="cpu").eval()
    cn = maisi_controlnet("ddpm", tiny=True, device="cpu").eval()
    seen = {}

    def spy(module, args, kwargs):
        seen.update({k: kwargs.get(k) for k in ("top_region_index_tensor", "bottom_region_index_tensor", "class_labels")})

    unet.register_forward_pre_hook(spy, with_kwargs=True)
    mask = torch.full((1, 1, 32, 32, 32), BODY_LABEL, dtype=torch.uint8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta", clip_sample=False)
    inf = MaisiInferer(sched, vae, cn, num_inference_steps=3, top_region="chest", bottom_region="abdomen", progress=False)
    out = inf(MetaTensor(mask, affine=torch.eye(4, dtype=torch.float64)), unet)
    assert out.shape == mask.shape and bool(torch.isfinite(out).all())
    assert seen["top_region_index_tensor"].tolist() == [[0.0, 100.0, 0.0, 0.0]]
    assert seen["bottom_region_index_tensor"].tolist() == [[0.0, 0.0, 100.0, 0.0]]
    assert seen["class_labels"] is None  # the DDPM UNet has no modality embedding


@pytest.mark.parametrize("adv_weight", [0.1, 0.0])
def test_vae_step_leaves_the_discriminator_out_only_without_an_adversarial_term(adv_weight):
    """adv_weight 0 (a reconstruction-first run, e.g. ``maisi_ct_demo.py train --set adv_weight=0``): the
    discriminator is neither run nor trained, the autoencoder
    still learns; with a positive weight both networks take their steps (real learning rates in both cases)."""
    from types import SimpleNamespace

    from monai.networks.nets import PatchDiscriminator

    from common.engines.maisi_steps import MaisiVAEStep

    torch.manual_seed(0)
    ae = maisi_autoencoder(tiny=True, num_splits=1)  # trained unsplit, as the step's docstring says
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=1, channels=4, in_channels=1, out_channels=1, norm="INSTANCE")
    calls = []
    disc.register_forward_hook(lambda *_: calls.append(1))
    step = MaisiVAEStep(ae, disc, torch.optim.Adam(ae.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3),
                        adv_weight=adv_weight)
    ae0 = [p.detach().clone() for p in ae.parameters()]
    d0 = [p.detach().clone() for p in disc.parameters()]
    engine = SimpleNamespace(state=SimpleNamespace(device="cpu"), device="cpu", amp=False)
    out = step(engine, {"image": torch.rand(1, 1, 32, 32, 32)})
    assert any(not torch.equal(a, p) for a, p in zip(ae0, ae.parameters()))
    disc_moved = any(not torch.equal(a, p) for a, p in zip(d0, disc.parameters()))
    if adv_weight == 0:
        assert not calls and not disc_moved and float(out["loss_d"]) == 0.0 and float(out["loss_adv_g"]) == 0.0
        assert float(out["loss"]) == pytest.approx(float(out["loss_l1"]) + 1e-7 * float(out["loss_kl"]), rel=1e-5)
    else:
        assert len(calls) == 3 and disc_moved and float(out["loss_d"]) > 0
