"""Encoder/decoder building blocks of the shared 3D VQ-GAN (:mod:`common.networks.vqgan`).

Two families, selected by ``VQGAN(style=...)``:

**taming** (ALDM; design of taming-transformers ``taming/modules/diffusionmodules/model.py`` as used
by the official ALDM v1 code ``jongdory/ALDM`` ``VQ-GAN/taming/modules/diffusionmodules/model.py``):
zero-padded convolutions, ResBlocks GN -> swish -> conv3 -> GN -> swish -> conv3 with a 1x1 shortcut
when the width changes (MONAI ``AEKLResBlock``), downsampling by zero pad (0, 1) per axis + conv k3 s2
(MONAI ``AEKLDownsample``), upsampling by nearest x2 + conv k3 (MONAI ``Upsample``), a mid block of
``num_mid_blocks`` ResBlocks and no attention (ALDM v1 never builds its attention layers).

**cldm** (NODDI-SR; medicaldiffusion 3D VQ-GAN ``FirasGit/medicaldiffusion``
``vq_gan_3d/model/vqgan.py``, TATS-derived, with the CLDM arguments): "same" padded convolutions
(:class:`SamePadConv3d`, replicate padding of total ``k - s`` split ceil/floor), downsampling by a
k4 s2 same-padded conv followed by ResBlocks, upsampling by :class:`SamePadConvTranspose3d` (k4 s2)
followed by ResBlocks, GN + SiLU at the encoder output and at the decoder input, no mid block.

Channel convention shared by both: level ``i`` has ``channels * channel_mult[i]`` features; the
encoder has ``num_res_blocks`` ResBlocks per level, the decoder ``num_res_blocks + 1`` (taming), and
there are ``len(channel_mult) - 1`` resolution changes (downsampling factor ``2**(L-1)``).

Shapes (3D; 2D works the same for the taming blocks):
    encoder: (B, in_channels, H, W, D) -> (B, out_channels, H/f, W/f, D/f)
    decoder: (B, in_channels, H/f, W/f, D/f) -> (B, out_channels, H, W, D)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.autoencoderkl import AEKLDownsample, AEKLResBlock
from torch import nn

__all__ = [
    "SamePadConv3d",
    "SamePadConvTranspose3d",
    "SamePadResBlock",
    "TamingEncoder",
    "TamingDecoder",
    "CLDMEncoder",
    "CLDMDecoder",
]


def _same_pad(kernel_size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """``F.pad`` argument for a total padding of ``k - s`` per axis, ceil before / floor after.

    ``F.pad`` lists the last axis first, hence the reversal.
    """
    pads: list[int] = []
    for k, s in reversed(list(zip(kernel_size, stride))):
        total = k - s
        pads += [total - total // 2, total // 2]
    return tuple(pads)


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)  # type: ignore[return-value]


class SamePadConv3d(nn.Module):
    """Conv3d whose output is ``ceil(input / stride)`` for inputs divisible by the stride.

    The input is padded by ``k - s`` per axis (``ceil`` before, ``floor`` after) with ``padding_mode``
    ("replicate" in medicaldiffusion) and convolved without padding. Replicate padding keeps a
    constant image constant at the borders, where zero padding would create an artificial edge.

    Shape: (B, C_in, H, W, D) -> (B, C_out, H/s, W/s, D/s).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        kernel_size, stride = _triple(kernel_size), _triple(stride)
        self.pad = _same_pad(kernel_size, stride)
        self.padding_mode = padding_mode
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.padding_mode)
        return self.conv(x)


class SamePadConvTranspose3d(nn.Module):
    """Transposed Conv3d that multiplies the size by ``stride`` exactly.

    The input is padded as in :class:`SamePadConv3d` (``k - s`` per axis, replicate), and the
    transposed convolution crops ``k - 1`` on each side: for k4 s2 an input of size n gives
    ``(n + 2 - 1) * 2 - 2 * 3 + 4 = 2n``.

    Shape: (B, C_in, H, W, D) -> (B, C_out, s H, s W, s D).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        kernel_size, stride = _triple(kernel_size), _triple(stride)
        self.pad = _same_pad(kernel_size, stride)
        self.padding_mode = padding_mode
        self.convt = nn.ConvTranspose3d(
            in_channels, out_channels, kernel_size, stride=stride, bias=bias, padding=tuple(k - 1 for k in kernel_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.padding_mode)
        return self.convt(x)


class SamePadResBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3 plus a shortcut, all convs same-padded (replicate).

    The shortcut is the identity at equal widths and a same-padded k3 conv otherwise (as in
    medicaldiffusion's ``ResBlock``). Shape: (B, C_in, *S) -> (B, C_out, *S).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = SamePadConv3d(in_channels, out_channels, 3, padding_mode=padding_mode)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = SamePadConv3d(out_channels, out_channels, 3, padding_mode=padding_mode)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else SamePadConv3d(in_channels, out_channels, 3, padding_mode=padding_mode)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


def _conv(spatial_dims: int, cin: int, cout: int, k: int) -> Convolution:
    return Convolution(spatial_dims, cin, cout, strides=1, kernel_size=k, padding=k // 2, conv_only=True)


def run_blocks(blocks: nn.Sequential, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``blocks(h)``, each block under activation checkpointing when ``checkpointing`` and gradients are on:
    only the blocks' inputs stay in memory and each block's activations are recomputed in the backward
    pass (same values and gradients, about a third more compute)."""
    if not (checkpointing and torch.is_grad_enabled()):
        return blocks(h)
    for block in blocks:
        h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
    return h


class TamingEncoder(nn.Module):
    """Taming-style encoder: conv_in, levels of ResBlocks with zero-pad downsampling, mid block, GN-swish-conv_out.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: base width ``ch``.
        channel_mult: width multiplier per level (``len - 1`` downsamplings).
        num_res_blocks: ResBlocks per level.
        num_mid_blocks: ResBlocks in the mid block (ALDM v1: 1; paper-scale 2, see the ALDM spec).
        out_channels: ``z_channels`` of the output conv.
        norm_num_groups, norm_eps: GroupNorm settings (taming hard-codes 32 and 1e-6).
        checkpointing: activation checkpointing of every ResBlock / resampling block in training
            (:func:`run_blocks`; not in taming, which trains on smaller volumes).

    Shape: (B, in_channels, *S) -> (B, out_channels, *S / 2**(len(channel_mult) - 1)).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_mid_blocks: int,
        out_channels: int,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = bool(checkpointing)
        widths = [channels * m for m in channel_mult]
        self.conv_in = _conv(spatial_dims, in_channels, channels, 3)
        blocks: list[nn.Module] = []
        cin = channels
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(AEKLResBlock(spatial_dims, cin, norm_num_groups, norm_eps, w))
                cin = w
            if i < len(widths) - 1:
                blocks.append(AEKLDownsample(spatial_dims, cin))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(
            *[AEKLResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin) for _ in range(num_mid_blocks)]
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, cin, eps=norm_eps)
        self.conv_out = _conv(spatial_dims, cin, out_channels, 3)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        h = run_blocks(self.mid, run_blocks(self.down, h, self.checkpointing), self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingDecoder(nn.Module):
    """Taming-style decoder: conv_in, mid block, levels (reversed) of ``num_res_blocks + 1`` ResBlocks with
    nearest x2 + conv upsampling, GN-swish-conv_out.

    Args: as :class:`TamingEncoder` (``checkpointing`` included), with ``in_channels`` = ``z_channels`` and ``out_channels`` = image
    channels. Shape: (B, in_channels, *S) -> (B, out_channels, *S * 2**(len(channel_mult) - 1)).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        num_mid_blocks: int,
        out_channels: int,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = bool(checkpointing)
        widths = [channels * m for m in channel_mult]
        cin = widths[-1]
        self.in_channels = in_channels
        self.conv_in = _conv(spatial_dims, in_channels, cin, 3)
        self.mid = nn.Sequential(
            *[AEKLResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin) for _ in range(num_mid_blocks)]
        )
        blocks: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                blocks.append(AEKLResBlock(spatial_dims, cin, norm_num_groups, norm_eps, widths[i]))
                cin = widths[i]
            if i > 0:
                blocks.append(
                    Upsample(
                        spatial_dims,
                        in_channels=cin,
                        out_channels=cin,
                        scale_factor=2.0,
                        mode="nontrainable",
                        pre_conv=None,
                        post_conv=_conv(spatial_dims, cin, cin, 3),
                        interp_mode="nearest",
                        align_corners=None,
                    )
                )
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, cin, eps=norm_eps)
        self.conv_out = _conv(spatial_dims, cin, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = run_blocks(self.up, run_blocks(self.mid, h, self.checkpointing), self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv (taming's adaptive GAN weight differentiates w.r.t. it)."""
        return self.conv_out.conv.weight


class CLDMEncoder(nn.Module):
    """medicaldiffusion/CLDM encoder: SamePadConv3d k3, per level a k4 s2 same-padded conv then
    ``num_res_blocks`` :class:`SamePadResBlock`, then GN + SiLU (no output conv; ``VQGAN`` adds the
    1x1 ``pre_vq_conv``).

    Shape: (B, in_channels, H, W, D) -> (B, channels * channel_mult[-1], H/f, W/f, D/f),
    f = 2**(len(channel_mult) - 1). CLDM: channels 64, channel_mult (1, 2): 3 x 64^3 -> 128 x 32^3.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.conv_in = SamePadConv3d(in_channels, widths[0], 3, padding_mode=padding_mode)
        blocks: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks.append(SamePadConv3d(cin, cout, 4, stride=2, padding_mode=padding_mode))
            blocks += [
                SamePadResBlock(cout, cout, norm_num_groups, norm_eps, padding_mode) for _ in range(num_res_blocks)
            ]
        self.down = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=norm_eps)
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm_out(self.down(self.conv_in(x))))


class CLDMDecoder(nn.Module):
    """medicaldiffusion/CLDM decoder: GN + SiLU, per level (reversed) a :class:`SamePadConvTranspose3d`
    k4 s2 then ``num_res_blocks + 1`` :class:`SamePadResBlock`, then SamePadConv3d k3 to the output.

    Args:
        upsample_keeps_width: False (default, the noddi_sr spec): the transposed conv of level ``i``
            maps ``channels * mult[i]`` to ``channels * mult[i - 1]`` (128 -> 64 for CLDM), mirroring
            the encoder. True: medicaldiffusion's own ``Decoder`` widths, where the up conv of the
            top level keeps its width (128 -> 128) and the output conv reads ``channels * mult[1]``.

    Shape: (B, channels * channel_mult[-1], h, w, d) -> (B, out_channels, f h, f w, f d).
    """

    def __init__(
        self,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        padding_mode: str = "replicate",
        upsample_keeps_width: bool = False,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.in_channels = widths[-1]
        self.norm_in = nn.GroupNorm(norm_num_groups, widths[-1], eps=norm_eps)
        blocks: list[nn.Module] = []
        cin = widths[-1]
        for i in reversed(range(1, len(widths))):
            cout = widths[i] if upsample_keeps_width else widths[i - 1]
            blocks.append(SamePadConvTranspose3d(cin, cout, 4, stride=2, padding_mode=padding_mode))
            blocks += [
                SamePadResBlock(cout, cout, norm_num_groups, norm_eps, padding_mode) for _ in range(num_res_blocks + 1)
            ]
            cin = cout
        self.up = nn.Sequential(*blocks)
        self.conv_out = SamePadConv3d(cin, out_channels, 3, padding_mode=padding_mode)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.up(F.silu(self.norm_in(z))))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv (for taming's adaptive GAN weight)."""
        return self.conv_out.conv.weight
