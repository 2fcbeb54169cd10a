"""Condition encoder of NODDI-SR: low-resolution DWI features → the VQ-GAN latent grid.

Design of CLDM ``code/lrmri_encoder.py`` (``guchengzhong/CLDM``, commit c632f21), re-implemented from the noddi_sr spec
§2.3; the VQ-GAN-style blocks are the shared :mod:`common.networks.vqgan_blocks` (replicate "same" padding).

    f (B, C_feat, X, Y, Z)
      → trilinear × scale                                   (B, C_feat, sX, sY, sZ)
      → CrossEmbedLayer: parallel convs k 3/5/9/13, widths hid/2, hid/4, hid/8, rest (zero 'same' padding), concat = h
      → encoder(h) = SamePadConv3d k3 (hid → hid), per level SamePadConv3d k4 s2 (→ 2 hid) + SamePadResBlock, GN+SiLU
        + residual(h) = Conv3d k3 s2 p1 per level (hid → 2 hid)
      → GN → SiLU → Conv3d k3 p1 (2 hid → out_ch)           (B, out_ch, sX/d, sY/d, sZ/d)

With scale 2 and one ×2 downsampling (CLDM: ``downsample=(2, 2, 2)``) the output grid equals the input LR grid, which
is the VQ-GAN latent grid of the matching HR patch (LR 32³ ↔ HR 64³ ↔ latent 32³).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vqgan_blocks import SamePadConv3d, SamePadResBlock

__all__ = ["CrossEmbedLayer3d", "LREncoder"]


class CrossEmbedLayer3d(nn.Module):
    """Parallel 3D convolutions with different kernel sizes, concatenated along channels (multi-scale embedding).

    Widths halve per kernel (out/2, out/4, …) and the last kernel takes the remainder, so 128 channels over kernels
    (3, 5, 9, 13) give 64, 32, 16, 16. Shape: (B, C_in, *S) → (B, out_channels, *S).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int] = (3, 5, 9, 13)) -> None:
        super().__init__()
        kernel_sizes = sorted(int(k) for k in kernel_sizes)
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd for 'same' padding, got {kernel_sizes}")
        widths = [out_channels // 2 ** (i + 1) for i in range(len(kernel_sizes) - 1)]
        widths.append(out_channels - sum(widths))
        if min(widths) < 1:
            raise ValueError(f"out_channels={out_channels} is too small for {len(kernel_sizes)} kernels")
        self.convs = nn.ModuleList(nn.Conv3d(in_channels, w, k, padding=k // 2) for w, k in zip(widths, kernel_sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class LREncoder(nn.Module):
    """Low-resolution feature encoder onto the VQ-GAN latent grid (noddi_sr spec §2.3).

    Args:
        in_channels: feature channels C_feat (2 per shell).
        out_channels: latent channels (the VQ-GAN ``embed_dim``; 8 at paper scale).
        scale: trilinear upsampling factor of the input (the HR/LR ratio).
        hid_channels: CrossEmbed width (128 paper, 64 light, 8 tiny); the encoder doubles it.
        downsample: per-axis downsampling of the encoder (powers of 2; one ×2 level per factor 2).
        kernel_sizes: CrossEmbed kernels.
        norm_num_groups: GroupNorm groups (32 paper, 4 tiny).
        padding_mode: padding of the same-padded encoder convs ("replicate", as the VQ-GAN).

    Shapes:
        (B, in_channels, X, Y, Z) → (B, out_channels, scale X / d, scale Y / d, scale Z / d), d = ``downsample``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 8,
        scale: int = 2,
        hid_channels: int = 128,
        downsample: Sequence[int] = (2, 2, 2),
        kernel_sizes: Sequence[int] = (3, 5, 9, 13),
        norm_num_groups: int = 32,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        self.scale = int(scale)
        downsample = tuple(int(d) for d in downsample)
        if len(set(downsample)) != 1 or downsample[0] < 1 or downsample[0] & (downsample[0] - 1):
            raise ValueError(f"downsample must be an isotropic power of 2, got {downsample}")
        n_levels = downsample[0].bit_length() - 1
        self.cross_embed = CrossEmbedLayer3d(in_channels, hid_channels, kernel_sizes)
        enc: list[nn.Module] = [SamePadConv3d(hid_channels, hid_channels, 3, padding_mode=padding_mode)]
        res: list[nn.Module] = []
        width = hid_channels
        for _ in range(n_levels):
            enc += [
                SamePadConv3d(width, 2 * width, 4, stride=2, padding_mode=padding_mode),
                SamePadResBlock(2 * width, 2 * width, norm_num_groups, padding_mode=padding_mode),
            ]
            res.append(nn.Conv3d(width, 2 * width, 3, stride=2, padding=1))
            width *= 2
        enc += [nn.GroupNorm(norm_num_groups, width), nn.SiLU()]
        self.encoder = nn.Sequential(*enc)
        self.residual = nn.Sequential(*res) if res else nn.Identity()
        self.head = nn.Sequential(nn.GroupNorm(norm_num_groups, width), nn.SiLU(), nn.Conv3d(width, out_channels, 3, padding=1))
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="trilinear", align_corners=False)
        h = self.cross_embed(x)
        return self.head(self.encoder(h) + self.residual(h))
