"""Adversarial losses, delayed start, adaptive weight and the PatchGAN discriminator factories."""

from __future__ import annotations

import pytest
import torch

from common.losses.adversarial import (
    adaptive_gan_weight,
    adopt_weight,
    get_gan_losses,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from common.networks.discriminators import aldm_discriminator, cldm_discriminators, disc_logits, random_slices


def test_hinge_losses_on_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - D): 0, 0.5, 2 -> mean 2.5 / 3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + D): 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3)
    # a perfect discriminator beyond the margins has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_vanilla_losses_match_bce():
    real, fake = torch.tensor([1.5, -0.3]), torch.tensor([0.2, -2.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    d = 0.5 * (bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(d.item(), rel=1e-6)
    assert vanilla_g_loss(fake).item() == pytest.approx(bce(fake, torch.ones(2)).item(), rel=1e-6)
    assert get_gan_losses("hinge") == (hinge_d_loss, hinge_g_loss)
    with pytest.raises(ValueError):
        get_gan_losses("wasserstein")


def test_adopt_weight_delay():
    assert [adopt_weight(s, start=3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert adopt_weight(0, start=0) == 1.0
    assert adopt_weight(10, start=5, weight=0.5) == 0.5 and adopt_weight(1, start=5, value=0.1) == 0.1


def test_adaptive_weight_ratio_clamp_and_scale():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    lam = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)  # grads a (norm 5) and b (norm 1)
    assert lam.item() == pytest.approx(0.8 * 5.0 / (1.0 + 1e-6))
    assert not lam.requires_grad
    # vanishing adversarial gradient: clamped at 1e4 before the 0.8 factor
    big = adaptive_gan_weight((w * a).sum(), (w * 0.0).sum(), w)
    assert big.item() == pytest.approx(0.8 * 1e4)


def test_aldm_discriminator_matches_the_spec_stack():
    with torch.device("meta"):
        disc = aldm_discriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == 32 for n in norms)
    assert abs(sum(p.numel() for p in disc.parameters()) / 1e6 - 2.77) < 0.01


def test_aldm_discriminator_init_and_tiny_latent_output():
    torch.manual_seed(0)
    disc = aldm_discriminator(in_channels=32, channels=32, num_layers_d=3)
    w = disc.initial_conv.conv.weight
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 2e-3  # N(0, 0.02)
    lat = aldm_discriminator(in_channels=3, channels=8, num_layers_d=1, norm_num_groups=4)
    assert disc_logits(lat(torch.randn(1, 3, 8, 8, 8))).shape[:2] == (1, 1)


def test_cldm_discriminators_2d_and_3d():
    d2, d3 = cldm_discriminators(in_channels=3, channels=8)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d2.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in d3.modules())
    assert d3.initial_conv.conv.padding == (2, 2, 2) and d3.initial_conv.conv.bias is not None
    x = torch.randn(2, 3, 16, 16, 16)
    sl, _ = random_slices(x, torch.Generator().manual_seed(0))
    assert disc_logits(d2(sl)).shape[:2] == (2, 1) and disc_logits(d3(x)).shape[:2] == (2, 1)


def test_random_slices_are_seeded_and_index_the_first_spatial_axis():
    x = torch.randn(3, 2, 10, 5, 4)
    s1, i1 = random_slices(x, torch.Generator().manual_seed(7))
    s2, i2 = random_slices(x, torch.Generator().manual_seed(7))
    assert torch.equal(i1, i2) and torch.equal(s1, s2) and s1.shape == (3, 2, 5, 4)
    for b in range(3):
        assert torch.equal(s1[b], x[b, :, i1[b]])
    # the same positions can be reused for the reconstruction
    y = x * 2
    sy, _ = random_slices(y, index=i1)
    assert torch.equal(sy, s1 * 2)
    draws = {tuple(random_slices(x, torch.Generator().manual_seed(s))[1].tolist()) for s in range(6)}
    assert len(draws) > 1
