"""``benchmarks/diffseg_demo.py``'s bf16 emulation, which gives the card's Dice change of bfloat16: every convolution
computes on bfloat16-rounded inputs and weights, rounds its output, and the network is float32 again afterwards."""

from __future__ import annotations

import torch

from benchmarks.diffseg_demo import bf16_rounding
from common.networks.diffseg_unet import DiffSegUNet


def test_bf16_rounding_is_bfloat16_arithmetic_and_leaves_the_network_as_it_was():
    torch.manual_seed(0)
    net = DiffSegUNet(4, 3, (4, 8, 8, 16)).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref = net(x, 2)
        with bf16_rounding(net):
            got = net(x, 2)
            conv = net.out
            # inside: the last convolution's weights are bfloat16 values, and so is what it returns
            assert torch.equal(conv.weight, conv.weight.to(torch.bfloat16).float())
            assert torch.equal(got, got.to(torch.bfloat16).float())
        after = net(x, 2)
    # a bfloat16-sized change (8 bits of mantissa), not float32 rounding and not a broken network
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 1e-4 < rel < 0.1
    assert torch.equal(after, ref)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
