"""The 5-step sampler as a MONAI Inferer (spec §4, §9)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import Inferer

from common.inferers import DiffSegInferer
from common.networks.diffseg_unet import DiffSegUNet
from common.schedulers import DiffSegScheduler

C = 3


class _Counter(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.divisor = net.divisor  # what the inferer reads to fit a window

    def forward(self, x, t=None):
        self.calls.append((tuple(x.shape), t))
        return self.net(x, t)


def _net(diffusion=True):
    torch.manual_seed(0)
    return DiffSegUNet(1 + C if diffusion else 1, C, (4, 8, 8, 16), time_conditioning=diffusion).eval()


def test_is_a_monai_inferer_and_returns_final_logits():
    inf = DiffSegInferer(C)
    assert isinstance(inf, Inferer)
    net = _Counter(_net())
    with torch.no_grad():
        out = inf(torch.rand(1, 1, 32, 32, 16), net)
    assert out.shape == (1, C, 32, 32, 16) and out.dtype == torch.float32
    assert [t for _, t in net.calls] == [4, 3, 2, 1, 0]  # T-1 ... 0, whole volume: one call per step


def test_exactly_T_calls_per_window():
    inf = DiffSegInferer(C, roi_size=(32, 32, 16), overlap=0.0, sw_batch_size=1)
    net = _Counter(_net())
    with torch.no_grad():
        inf(torch.rand(1, 1, 64, 32, 32), net)  # 2 x 1 x 2 = 4 windows
    assert len(net.calls) == 5 * 4
    assert all(shape == (1, 1 + C, 32, 32, 16) for shape, _ in net.calls)
    # per-patch stitching: still T calls per window
    net.calls.clear()
    with torch.no_grad():
        DiffSegInferer(C, roi_size=(32, 32, 16), overlap=0.0, stitching="per_patch")(torch.rand(1, 1, 64, 32, 32), net)
    assert len(net.calls) == 5 * 4


def test_T_follows_the_scheduler_and_baseline_is_one_pass():
    net = _Counter(_net())
    with torch.no_grad():
        DiffSegInferer(C, scheduler=DiffSegScheduler(10))(torch.rand(1, 1, 32, 32, 16), net)
    assert len(net.calls) == 10
    base = _Counter(_net(diffusion=False))
    with torch.no_grad():
        out = DiffSegInferer(C, diffusion=False)(torch.rand(1, 1, 32, 32, 16), base)
    assert len(base.calls) == 1 and base.calls[0][0][1] == 1 and out.shape[1] == C


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeded_runs_are_identical(sampler):
    x = torch.rand(1, 1, 32, 32, 16)
    net = _net()
    with torch.no_grad():
        a = DiffSegInferer(C, sampler=sampler, seed=7)(x, net)
        b = DiffSegInferer(C, sampler=sampler, seed=7)(x, net)
        c = DiffSegInferer(C, sampler=sampler, seed=8)(x, net)
    assert torch.equal(a, b) and torch.equal(a.argmax(1), b.argmax(1))
    assert not torch.equal(a, c)  # the seed really drives x_T


def test_ddim_eta_zero_is_deterministic_given_x_T():
    """With eta = 0 only x_T is random: same x_T, any step-noise stream -> same result."""
    s = DiffSegScheduler()
    net = _net()
    x = torch.rand(1, 1, 32, 32, 16)
    x_T = torch.randn(1, C, 32, 32, 16, generator=torch.Generator().manual_seed(0))

    def chain(gen):
        x_k = x_T.clone()
        for k in reversed(range(5)):
            logits = net(torch.cat([x, x_k], 1), k)
            x_k = s.step(s.logits_to_x0(logits), x_k, k, "ddim", 0.0, gen)
        return logits

    with torch.no_grad():
        assert torch.equal(chain(torch.Generator().manual_seed(1)), chain(torch.Generator().manual_seed(2)))


def test_save_steps_keeps_T_probability_maps():
    inf = DiffSegInferer(C, save_steps=True)
    with torch.no_grad():
        inf(torch.rand(1, 1, 32, 32, 16), _net())
    assert len(inf.step_probs) == 5
    torch.testing.assert_close(inf.step_probs[-1].sum(1), torch.ones(1, 32, 32, 16))


def _reference_chain(inferer: DiffSegInferer, image: torch.Tensor, net) -> torch.Tensor:
    """The per-step chain written plainly: MONAI's ``sliding_window_inference`` on ``cat([image, x_k])`` each step."""
    from monai.inferers import sliding_window_inference

    generator = torch.Generator().manual_seed(int(inferer.seed))
    roi = inferer.window_size(image.shape[2:], net)
    pads = inferer._pad_to_roi(image.shape[2:], roi)
    padded = torch.nn.functional.pad(image, pads, mode="replicate") if pads else image
    x_k = torch.randn((image.shape[0], C, *padded.shape[2:]), generator=generator)
    for k in reversed(range(inferer.scheduler.num_timesteps)):
        joint = torch.cat([padded, x_k], dim=1)
        logits = sliding_window_inference(joint, roi, predictor=lambda w, k=k: net(w, k),
                                          **inferer.sw_kwargs).float()
        x_k = inferer.scheduler.step(inferer.scheduler.logits_to_x0(logits), x_k, k, inferer.sampler, inferer.eta,
                                     generator)
    if not pads:
        return logits
    crop = [slice(None), slice(None)]
    for axis, size in enumerate(image.shape[2:]):
        before = pads[2 * (image.dim() - 3 - axis)]
        crop.append(slice(before, before + size))
    return logits[tuple(crop)]


@pytest.mark.parametrize("batch, sw_batch_size, overlap, sampler, eta",
                         [(1, 4, 0.25, "ddpm", 0.0), (2, 3, 0.5, "ddim", 0.5), (1, 1, 0.0, "ddim", 0.0)])
def test_per_step_windows_equal_sliding_window_inference_bitwise(batch, sw_batch_size, overlap, sampler, eta):
    # the window grid, batch buffer and count map are made once per volume instead of once per step, and the step
    # noise is drawn by a second thread during the network passes; the windows, batches, additions and the order of
    # draws from the generator are those of the plain loop, so the logits must not change by a single bit.
    # The volume is shorter than the window along its last axis (padded, replicate) and uneven along the others.
    inferer = DiffSegInferer(C, roi_size=(32, 16, 16), sw_batch_size=sw_batch_size, overlap=overlap,
                             padding_mode="replicate", seed=3, sampler=sampler, eta=eta)
    net = _Counter(_net())
    image = torch.rand(batch, 1, 71, 37, 12)
    with torch.no_grad():
        got = inferer(image, net)
        calls = len(net.calls)
        expected = _reference_chain(inferer, image, net)
    assert got.shape == (batch, C, 71, 37, 12)
    assert torch.equal(got, expected)
    assert calls == len(net.calls) - calls  # the same number of network passes


def test_per_step_windows_keep_the_metadata_of_a_metatensor_input():
    # sliding_window_inference returned the input's metadata on the logits; the inversion to the input's grid
    # (Invertd in inference.json) reads it, so the window grid must return a MetaTensor carrying the same
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([1.5, 1.5, 5.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 1, 40, 20, 16), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    inferer = DiffSegInferer(C, roi_size=(32, 16, 16), sw_batch_size=2, padding_mode="replicate", seed=1)
    net = _net()
    with torch.no_grad():
        got = inferer(image, net)
        expected = _reference_chain(inferer, image.as_tensor(), net)
    assert isinstance(got, MetaTensor) and torch.equal(got.as_tensor(), expected)
    assert torch.equal(got.affine, affine) and got.meta["filename_or_obj"] == "case.nii.gz"


def test_fit_window_shrinks_the_window_to_a_short_axis_and_samples_the_same_chain():
    # a 12-slice slab under a 32-slice window: fitted, the window is 16 slices (the network's divisor), so the
    # padding is 4 slices instead of 20 and each pass costs half; the chain is the plain one with that window
    net = _Counter(_net())
    assert net.net.divisor == 16
    image = torch.rand(1, 1, 40, 37, 12)
    inferer = DiffSegInferer(C, roi_size=(32, 32, 32), sw_batch_size=2, padding_mode="replicate", seed=2,
                             fit_window=True)
    assert inferer.window_size(image.shape[2:], net.net) == (32, 32, 16)
    with torch.no_grad():
        got = inferer(image, net)
        shapes = {shape[2:] for shape, _ in net.calls}
        expected = _reference_chain(inferer, image, net.net)
    assert shapes == {(32, 32, 16)}
    assert got.shape == (1, C, 40, 37, 12) and torch.equal(got, expected)
    # without fitting, the same slab is padded to the full window, and the logits differ
    net.calls.clear()
    with torch.no_grad():
        padded = DiffSegInferer(C, roi_size=(32, 32, 32), sw_batch_size=2, padding_mode="replicate", seed=2)(image, net)
    assert {shape[2:] for shape, _ in net.calls} == {(32, 32, 32)}
    assert not torch.allclose(padded, got)
    # the non-diffusion baseline runs its single pass in the fitted window too
    base = _Counter(_net(diffusion=False))
    with torch.no_grad():
        out = DiffSegInferer(C, roi_size=(32, 32, 32), diffusion=False, fit_window=True)(image, base)
    assert out.shape == (1, C, 40, 37, 12) and {shape[2:] for shape, _ in base.calls} == {(32, 32, 16)}


def test_grown_window_covers_a_longer_axis_in_one_window_and_samples_the_same_chain():
    # max_window_fraction (opt-in): a 40 x 37 x 12 volume under a 32^3 window runs in one 48 x 48 x 16 window (each
    # axis rounded up to the divisor) instead of four 32 x 32 x 16 ones: 5 passes instead of 20, the plain chain
    net = _Counter(_net())
    image = torch.rand(1, 1, 40, 37, 12)
    inferer = DiffSegInferer(C, roi_size=(32, 32, 32), sw_batch_size=1, padding_mode="replicate", seed=2,
                             fit_window=True, max_window_fraction=1.5)
    with torch.no_grad():
        got = inferer(image, net)
        expected = _reference_chain(inferer, image, net.net)
    assert [shape for shape, _ in net.calls] == [(1, 1 + C, 48, 48, 16)] * inferer.scheduler.num_timesteps
    assert got.shape == (1, C, 40, 37, 12) and torch.equal(got, expected)
    # without growth the same volume takes four windows per step
    net.calls.clear()
    with torch.no_grad():
        DiffSegInferer(C, roi_size=(32, 32, 32), seed=2, fit_window=True)(image, net)
    assert len(net.calls) == 4 * inferer.scheduler.num_timesteps and {s[2:] for s, _ in net.calls} == {(32, 32, 16)}


def test_fit_window_sizes():
    from types import SimpleNamespace

    inferer = DiffSegInferer(C, roi_size=(32, 32, 32), fit_window=True, window_multiple=4, min_window_fraction=0.0)
    # only the axes where the volume is smaller shrink, each to the next multiple, never past the window
    assert inferer.window_size((40, 10, 31)) == (32, 12, 32)
    assert inferer.window_size((3, 32, 64)) == (4, 32, 32)
    # by default a fitted window keeps at least half the configured one (then rounded up to the multiple)
    inferer = DiffSegInferer(C, roi_size=(32, 32, 40), fit_window=True, window_multiple=4)
    assert inferer.window_size((40, 10, 31)) == (32, 16, 32)
    assert inferer.window_size((3, 17, 19)) == (16, 20, 20)
    # the multiple defaults to the network's divisor, also through a runtime wrapper that keeps the network
    inferer = DiffSegInferer(C, roi_size=(32, 32, 32), fit_window=True)
    assert inferer.window_size((40, 10, 17), _net()) == (32, 16, 32)
    assert inferer.window_size((40, 10, 17), SimpleNamespace(network=_net())) == (32, 16, 32)
    assert inferer.window_size((40, 10, 17), torch.nn.Identity()) == (32, 16, 17)  # no divisor: 1 (and half of 32)
    assert DiffSegInferer(C, roi_size=(32, 32, 32)).window_size((40, 10, 17)) == (32, 32, 32)
    assert DiffSegInferer(C, fit_window=True).window_size((40, 10, 17)) is None  # whole volume
    with pytest.raises(ValueError, match="window_multiple"):
        DiffSegInferer(C, window_multiple=0)
    with pytest.raises(ValueError, match="min_window_fraction"):
        DiffSegInferer(C, min_window_fraction=1.5)
    # growth: an axis longer than the window but within max_window_fraction windows gets one window covering it
    # (rounded up to the multiple); longer axes keep the configured window; shorter ones shrink as above
    inferer = DiffSegInferer(C, roi_size=(32, 32, 32), fit_window=True, window_multiple=4, max_window_fraction=1.5)
    assert inferer.window_size((47, 49, 10)) == (48, 32, 16)
    assert inferer.window_size((33, 48, 32)) == (36, 48, 32)
    assert DiffSegInferer(C, roi_size=(32, 32, 32), max_window_fraction=2.0).window_size((47, 49, 10)) == (32, 32, 32)
    with pytest.raises(ValueError, match="max_window_fraction"):
        DiffSegInferer(C, max_window_fraction=0.9)
