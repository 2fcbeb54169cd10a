"""Recycling training step, importance sampling and training progress (spec §3, §9)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.engines.diffseg_step import DiffSegStep, ImportanceTimeSampler
from common.losses.segmentation import SegmentationLoss
from common.networks.diffseg_unet import DiffSegUNet
from common.schedulers import DiffSegScheduler

TINY = (4, 8, 8, 16)
C = 3


def _step(diffusion=True, **kw):
    torch.manual_seed(0)
    net = DiffSegUNet(1 + C if diffusion else 1, C, TINY, time_conditioning=diffusion)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    return DiffSegStep(net, opt, SegmentationLoss(), C, DiffSegScheduler(5), diffusion=diffusion, seed=0, **kw)


def _batch(b=2):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(b, 1, 32, 32, 16, generator=g)
    label = torch.randint(0, C, (b, 1, 32, 32, 16), generator=g)
    return image, label


class _Recorder(torch.nn.Module):
    """Wraps the network and records (t, requires_grad of the input, grad mode) of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t=None):
        self.calls.append((t.clone() if torch.is_tensor(t) else t, x.requires_grad, torch.is_grad_enabled()))
        return self.net(x, t)


def test_recycling_next_uses_k_plus_one_without_gradient():
    step = _step(recycling="next")
    rec = _Recorder(step.network)
    step.network = rec
    image, label = _batch(4)
    loss, _ = step.compute_loss(image, label)
    k, k_re = step.last_inputs["k"], step.last_inputs["k_re"]
    assert torch.equal(k_re, torch.clamp(k + 1, max=4))
    (t_first, _, grad_first), (t_second, _, grad_second) = rec.calls
    assert torch.equal(t_first, k_re) and torch.equal(t_second, k)
    assert grad_first is False and grad_second is True  # first pass under no_grad
    assert step.last_inputs["x_k"].requires_grad is False
    assert loss.requires_grad


def test_gradients_equal_those_of_a_detached_input():
    step = _step(recycling="next")
    image, label = _batch(2)
    loss, _ = step.compute_loss(image, label)
    step.network.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in step.network.parameters()]
    # recompute the second pass only, on the stored x_k explicitly detached
    step.network.zero_grad()
    k, x_k = step.last_inputs["k"], step.last_inputs["x_k"].detach()
    logits = step.network(torch.cat([image, x_k], 1), k)
    ref = step.loss_function(logits, label, reduction="none")["loss"].mean()
    torch.testing.assert_close(ref, loss)
    ref.backward()
    for g, p in zip(grads, step.network.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_xT_recycles_from_the_last_step_and_draws_k_below_it():
    step = _step(recycling="xT")
    rec = _Recorder(step.network)
    step.network = rec
    seen = set()
    for _ in range(8):
        image, label = _batch(4)
        step.compute_loss(image, label)
        assert bool((step.last_inputs["k_re"] == 4).all())
        seen.update(step.last_inputs["k"].tolist())
    assert seen == {0, 1, 2, 3}


def test_no_recycling_calls_the_network_once():
    step = _step(recycling="none")
    rec = _Recorder(step.network)
    step.network = rec
    step.compute_loss(*_batch(2))
    assert len(rec.calls) == 1


def test_importance_sampler_weights_and_warm_up():
    s = ImportanceTimeSampler(5, min_count=10)
    k, w = s.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(64))  # uniform p during warm-up -> weight 1
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    torch.testing.assert_close(s.weights(torch.arange(5), p), 1.0 / (5 * p))
    for step in range(5):
        s.update(torch.full((9,), step), torch.full((9,), float(step + 1)))
    assert not s.warmed_up  # 9 samples per step: still uniform
    torch.testing.assert_close(s.probabilities(), torch.full((5,), 0.2, dtype=torch.float64))
    for step in range(5):
        s.update(torch.tensor([step]), torch.tensor([float(step + 1)]))
    assert s.warmed_up
    p = s.probabilities()
    expect = 0.99 * torch.arange(1, 6, dtype=torch.float64) / 15 + 0.01 / 5  # sqrt(E[L^2]) = L here
    torch.testing.assert_close(p, expect)
    k, w = s.sample(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, (1.0 / (5 * p[k])).float())
    # higher loss -> sampled more often
    counts = torch.bincount(k, minlength=5)
    assert counts[4] > counts[0]


def test_importance_weighted_loss_in_the_step():
    step = _step(time_sampling="importance")
    step.importance.loss_sq[:] = torch.tensor([1.0, 4.0, 9.0, 16.0, 25.0], dtype=torch.float64)
    step.importance.counts[:] = 10
    p = step.importance.probabilities()  # the distribution the batch is drawn from
    image, label = _batch(2)
    loss, terms = step.compute_loss(image, label)
    k = step.last_inputs["k"]
    assert step.importance.counts.sum() == 5 * 10 + 2  # the batch's losses were recorded
    per_sample = step.loss_function(step.network(torch.cat([image, step.last_inputs["x_k"]], 1), k), label, reduction="none")["loss"]
    torch.testing.assert_close(loss, (per_sample / (5 * p[k]).float()).mean(), rtol=1e-5, atol=1e-6)


def test_epsilon_and_baseline_modes_produce_their_terms():
    eng = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu"), iteration=1), amp=False)
    out = _step(model_out="epsilon")(eng, dict(zip(("image", "label"), _batch(2))))
    assert {"loss", "loss_dice", "loss_ce", "loss_mse"} <= set(out) and all(np.isfinite(v) for v in out.values())
    base = _step(diffusion=False)
    rec = _Recorder(base.network)
    base.network = rec
    out = base(eng, dict(zip(("image", "label"), _batch(2))))
    assert set(out) == {"loss", "loss_dice", "loss_ce"}
    assert rec.calls[0][0] is None  # no time input


def _demo_batches(ct_demo: Path, n: int = 2):
    """Tiny-configuration training batches of the real demo CT (6 mm, HU window, 32x32x16 crops)."""
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandSpatialCropd

    from common.transforms.segmentation import ResampleToSpacingd, intensity_transform

    items = load_decathlon_datalist(str(ct_demo), data_list_key="training", base_dir=str(ct_demo.parent))[:n]
    pre = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS", labels=None),
            ResampleToSpacingd(["image", "label"], [6.0, 6.0, 6.0], mode=["bilinear", "nearest"]),
            intensity_transform(["image"], "CT"),
        ]
    )
    vols = [pre(i) for i in items]
    crop = RandSpatialCropd(["image", "label"], roi_size=[32, 32, 16], random_size=False)
    crop.set_random_state(0)
    labels = json.loads(ct_demo.read_text())["labels"]
    return vols, crop, len(labels)


def test_training_a_few_dozen_iterations_lowers_the_loss(ct_demo):
    vols, crop, num_classes = _demo_batches(ct_demo)
    torch.manual_seed(0)
    net = DiffSegUNet(1 + num_classes, num_classes, TINY)
    step = DiffSegStep(net, torch.optim.AdamW(net.parameters(), lr=3e-3), SegmentationLoss(), num_classes, DiffSegScheduler(5), seed=0)
    losses = []
    for it in range(1, 31):
        crops = [crop(v) for v in vols]
        batch = {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in ("image", "label")}
        eng = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu"), iteration=it), amp=False)
        losses.append(step(eng, batch)["loss"])
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("mode", ["next", "xT", "none"])
def test_step_state_round_trip(mode):
    step = _step(recycling=mode, time_sampling="importance")
    step.compute_loss(*_batch(2))
    state = step.state_dict()
    a = step.sample_steps(8)
    other = _step(recycling=mode, time_sampling="importance")
    other.load_state_dict(state)
    b = other.sample_steps(8)
    assert torch.equal(a[0], b[0])
