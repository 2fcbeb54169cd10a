"""Time-conditioned UNet (spec §2) and the Dice-without-background + CE/focal loss (spec §3)."""

from __future__ import annotations

import pytest
import torch

from common.losses.segmentation import SegmentationLoss
from common.networks.diffseg_unet import DiffSegUNet

TINY = (4, 8, 8, 16)


def test_output_shape_and_divisibility():
    torch.manual_seed(0)
    net = DiffSegUNet(1 + 3, 3, TINY)
    out = net(torch.randn(2, 4, 32, 16, 48), torch.tensor([0, 4]))
    assert out.shape == (2, 3, 32, 16, 48)
    # four halvings: the bottom of a 32x16x48 input is 2x1x3
    assert net.divisor == 16


def test_time_embedding_changes_the_output_and_none_means_step_zero():
    torch.manual_seed(0)
    net = DiffSegUNet(1 + 3, 3, TINY).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    emb = net.embed_time(torch.tensor([0, 1, 4]), 3, x.device)
    assert emb.shape == (3, 4 * TINY[0])
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[1], emb[2])
    with torch.no_grad():
        y0, y3, ynone = net(x, 0), net(x, 3), net(x)
    assert not torch.allclose(y0, y3)
    assert torch.equal(y0, ynone)


def test_baseline_has_image_channels_only_and_ignores_time():
    torch.manual_seed(0)
    net = DiffSegUNet(1, 3, TINY, time_conditioning=False).eval()
    assert net.stem[0].in_channels == 1
    assert not any("time_proj" in n for n, _ in net.named_parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, 3))
    with pytest.raises(ValueError):
        net(torch.randn(1, 4, 16, 16, 16))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = DiffSegUNet(2, 2, TINY)
    b = DiffSegUNet(2, 2, TINY, use_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 16, 16, 16)
    a(x, 2).square().mean().backward()
    b(x, 2).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


def _case():
    torch.manual_seed(0)
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, 2:5, 2:5, 2:5] = 1  # sample 0: class 1 only
    label[1, 0, 1:4, 1:4, 1:4] = 2  # sample 1: class 2 only; class 3 absent everywhere
    return torch.randn(2, 4, 8, 8, 8), label


def test_dice_ignores_absent_classes_and_background():
    logits, label = _case()
    loss = SegmentationLoss(dice=1.0, ce=0.0)
    base = loss(logits, label)["loss_dice"]
    # change only the absent class 3 (in both samples) -> Dice unchanged
    changed = logits.clone()
    changed[:, 3] += 5.0 * torch.randn_like(changed[:, 3])
    # class 3 logits change the softmax of the other channels too; compare with probabilities
    probs = torch.softmax(logits, 1)
    probs2 = probs.clone()
    probs2[:, 3] = probs[:, 3] * 0.1
    probs2[:, 0] += probs[:, 3] * 0.9  # mass moved between background and an absent class
    d1 = loss(probs, label, input_is_prob=True)["loss_dice"]
    d2 = loss(probs2, label, input_is_prob=True)["loss_dice"]
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(d1, base)
    # class 2 is absent from sample 0: its prediction there does not matter
    probs3 = probs.clone()
    probs3[0, 2], probs3[0, 0] = probs[0, 0], probs[0, 2]
    torch.testing.assert_close(loss(probs3, label, input_is_prob=True)["loss_dice"], d1)
    # ... but it matters in sample 1, where class 2 is present
    probs4 = probs.clone()
    probs4[1, 2], probs4[1, 0] = probs[1, 0], probs[1, 2]
    assert not torch.allclose(loss(probs4, label, input_is_prob=True)["loss_dice"], d1)


def test_perfect_prediction_has_zero_dice_and_per_sample_reduction():
    _, label = _case()
    onehot = torch.nn.functional.one_hot(label[:, 0], 4).movedim(-1, 1).float()
    out = SegmentationLoss(dice=1.0, ce=1.0)(onehot * 40.0, label)
    assert float(out["loss_dice"]) < 1e-6 and float(out["loss_ce"]) < 1e-6
    logits, _ = _case()
    none = SegmentationLoss()(logits, label, reduction="none")
    mean = SegmentationLoss()(logits, label)
    assert none["loss"].shape == (2,)
    # one present class per sample: the batch Dice is the mean of the per-sample Dice
    torch.testing.assert_close(none["loss_dice"].mean(), mean["loss_dice"])
    torch.testing.assert_close(none["loss_ce"].mean(), mean["loss_ce"])


def test_terms_and_weights():
    logits, label = _case()
    out = SegmentationLoss(dice=1.0, ce=1.0)(logits, label)
    assert set(out) == {"loss", "loss_dice", "loss_ce"}  # no focal unless configured
    torch.testing.assert_close(out["loss"], out["loss_dice"] + out["loss_ce"])
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    torch.testing.assert_close(out["loss_ce"], ce)
    focal = SegmentationLoss(dice=1.0, ce=0.0, focal=20.0)(logits, label)
    assert set(focal) == {"loss", "loss_dice", "loss_focal"}
    torch.testing.assert_close(focal["loss"], focal["loss_dice"] + 20.0 * focal["loss_focal"])
    p = torch.softmax(logits, 1).gather(1, label)
    torch.testing.assert_close(focal["loss_focal"], (-(1 - p) ** 2 * p.log()).mean())
    # gradients stay finite although absent (sample, class) pairs are masked
    x = logits.clone().requires_grad_(True)
    SegmentationLoss()(x, label)["loss"].backward()
    assert torch.isfinite(x.grad).all()
