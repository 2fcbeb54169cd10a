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
