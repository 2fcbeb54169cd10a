"""iVAN network: parameter count, invertibility (random weights, real slices, after training), LU 1x1 conv."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.fetch import demo_file
from common.engines.ivan_step import ivan_losses
from common.networks.ivan import IVAN, AffineCouplingBlock, DenseBlock, InvertibleConv1x1LU, IVANPredictor


def _n(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_official_network():
    net = IVAN(channels=2, num_blocks=8, growth=32)
    assert _n(DenseBlock(1, 1, 32)) == 57_738
    assert sum(_n(b.f) + _n(b.g) + _n(b.h) for b in net.blocks) == 1_385_712
    assert _n(net) == 1_385_792


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_odd_or_single_channel_count_is_rejected(channels):
    with pytest.raises(ValueError):
        IVAN(channels=channels)
    with pytest.raises(ValueError):
        AffineCouplingBlock(channels)


@pytest.mark.parametrize("channels", [2, 4, 6])
def test_inverse_of_forward_is_identity_random_input(channels):
    torch.manual_seed(channels)
    net = IVAN(channels=channels, seed=channels).eval()  # paper size: 8 blocks, growth 32
    x = torch.rand(2, channels, 32, 40)
    with torch.no_grad():
        y = net(x)
        assert (net.inverse(y) - x).abs().max() < 1e-4
        assert (net(y, rev=True) - x).abs().max() < 1e-4
        for block in net.blocks:  # the same per block
            assert (block.inverse(block(x)) - x).abs().max() < 1e-5
        net64, x64 = net.double(), x.double()
        assert (net64.inverse(net64(x64)) - x64).abs().max() < 1e-10
    assert not torch.allclose(y.float(), x)  # the map is not trivially the identity


def _real_slices() -> torch.Tensor:
    """Axial slices 40 and 50 of the real avg152 T1 and PD, scaled to [0, 1]: (2, 2, 91, 109)."""
    vols = []
    for name in ("spm/avg152T1.nii", "spm/avg152PD.nii"):
        v = np.asarray(nib.load(str(demo_file(name))).dataobj, dtype=np.float32)
        vols.append(v / np.percentile(v, 99.5))
    x = np.stack([np.stack([v[:, :, z] for v in vols]) for z in (40, 50)])
    return torch.from_numpy(np.clip(x, 0, 1))


def test_invertible_on_real_slices_before_and_after_training():
    torch.manual_seed(0)
    x = _real_slices()[..., 25:57, 35:75].contiguous()  # 32x40 crop keeps the CPU test short
    t2 = x[:, :1].flip(-1).contiguous()  # any target: only invertibility is tested here
    net = IVAN(channels=2, growth=16, seed=0)  # 8 blocks; growth 16 keeps the CPU test short
    with torch.no_grad():
        assert (net.inverse(net(x)) - x).abs().max() < 1e-4
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for _ in range(5):
        opt.zero_grad()
        ivan_losses(net, x, t2.expand(-1, 2, -1, -1), n_out=1)["loss"].backward()
        opt.step()
    with torch.no_grad():
        # unclamped tensors: the training loss goes through clamps, invertibility must not rely on them
        assert (net.inverse(net(x)) - x).abs().max() < 1e-4
        x_rand = torch.rand(2, 2, 32, 40)
        assert (net.inverse(net(x_rand)) - x_rand).abs().max() < 1e-4


def test_lu_parametrisation_is_an_invertible_1x1_convolution():
    torch.manual_seed(1)
    conv = InvertibleConv1x1LU(4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # move away from the orthogonal start
        conv.lower.add_(0.1 * torch.randn(4, 4))
        conv.upper.add_(0.1 * torch.randn(4, 4))
        conv.log_s.add_(0.2 * torch.randn(4))
    lower = torch.tril(conv.lower, -1) + torch.eye(4)
    upper = torch.triu(conv.upper, 1) + torch.diag(conv.sign_s * torch.exp(conv.log_s))
    w = conv.weight()
    torch.testing.assert_close(w, conv.perm @ lower @ upper)
    det = torch.linalg.det(w.double())
    expected = torch.prod(conv.sign_s.double() * torch.exp(conv.log_s.double())) * torch.linalg.det(conv.perm.double())
    torch.testing.assert_close(det, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(w.double() @ torch.linalg.inv(w.double()), torch.eye(4, dtype=torch.float64))
    x = torch.rand(2, 4, 8, 10)
    assert conv.logdet(x).item() == pytest.approx(80 * conv.log_s.sum().item(), rel=1e-6)
    assert torch.linalg.slogdet(w.double())[1].item() == pytest.approx(conv.log_s.sum().item(), abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(conv.inverse(conv(x)), x, atol=1e-5, rtol=0)
    # initialisation: W is orthogonal (QR of a Gaussian matrix)
    fresh = InvertibleConv1x1LU(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh.weight() @ fresh.weight().T, torch.eye(6), atol=1e-5, rtol=0)


def test_coupling_scale_is_bounded_by_the_clamp():
    torch.manual_seed(2)
    block = AffineCouplingBlock(2, clamp=0.8, growth=8)
    y1 = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        for conv in block.h.convs:
            conv.weight.mul_(2.0)
        s = block.scale(y1)
        assert 0.3 < s.abs().max() < 0.8
        for conv in block.h.convs:
            conv.weight.mul_(50.0)  # saturated sigmoid: float32 reaches the bound itself, never beyond
        assert block.scale(10 * y1).abs().max() <= 0.8


def test_zero_last_init_makes_each_coupling_an_identity():
    net = IVAN(channels=2, num_blocks=3, growth=8, init="zero_last", seed=0)
    x = torch.rand(1, 2, 12, 14)
    with torch.no_grad():
        y = x
        for b in net.blocks:
            y = b.conv1x1(y)
        torch.testing.assert_close(net(x), y)
    with pytest.raises(ValueError):
        IVAN(init="kaiming")


def test_predictor_directions_and_shapes():
    net = IVAN(channels=4, num_blocks=2, growth=8, seed=0).eval()
    x = torch.rand(2, 4, 16, 20)
    with torch.no_grad():
        fwd = IVANPredictor(net, n_in=2, n_out=3, direction="forward")(x)
        rev = IVANPredictor(net, n_in=2, n_out=3, direction="reverse")(x)
        both = IVANPredictor(net, n_in=2, n_out=3, direction="both")(x)
        first = IVANPredictor(net, n_in=2, n_out=3, direction="forward", augmentation="zeros")(x)
    assert fwd.shape == (2, 3, 16, 20) and rev.shape == (2, 2, 16, 20) and both.shape == (2, 5, 16, 20)
    y = torch.clamp(net(x), 0, 1)
    torch.testing.assert_close(fwd[:, 0], (y[:, 0] + y[:, 3]) / 2)  # channels 0 and 3 are group 0 of 3
    torch.testing.assert_close(first, y[:, :3])
    torch.testing.assert_close(both[:, :3], fwd)
    assert 0 <= both.min() and both.max() <= 1
    with pytest.raises(ValueError):
        IVANPredictor(net, 1, 1, direction="sideways")


def test_predictor_keeps_zero_padding_as_background():
    """Pixels where every input channel is exactly 0 (a slice padded into a larger field of view) are 0 in every
    direction's output; everywhere else the output is the network's, unchanged."""
    net = IVAN(channels=2, num_blocks=2, growth=8, seed=0).eval()
    x = torch.nn.functional.pad(torch.rand(1, 2, 16, 20) + 0.05, (6, 6, 4, 4))  # (1, 2, 24, 32), a zero border
    outside = (x == 0).all(dim=1)
    with torch.no_grad():
        y = torch.clamp(net(x), 0, 1)
        assert (y.mean(dim=1)[outside] != 0).float().mean() > 0.5  # the biases alone would paint the border
        for direction, n in (("forward", 1), ("reverse", 1), ("both", 2)):
            out = IVANPredictor(net, n_in=1, n_out=1, direction=direction)(x)
            assert out.shape[1] == n and (out[:, :, outside[0]] == 0).all(), direction
        fwd = IVANPredictor(net, n_in=1, n_out=1, direction="forward")(x)
        torch.testing.assert_close(fwd[0, 0][~outside[0]], y.mean(dim=1)[0][~outside[0]])
