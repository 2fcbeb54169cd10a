"""MS-SPADE: switchable, self-modulated SPADE blocks acting on a quantised VQ-GAN latent (ALDM).

Source: J. Kim, H. Park, "Adaptive Latent Diffusion Model for 3D Medical Image to Image
Translation: Multi-modal Magnetic Resonance Imaging Study", WACV 2024 (arXiv 2311.00265), and
its official v1 code (jongdory/ALDM, ``VQ-GAN/taming/models/normalization.py``).

A SPADE unit normalises ``h`` with a parameter-free instance norm and re-modulates it with a
scale and a bias predicted *from h itself* (there is no segmentation map in ALDM)::

    SPADE(h) = IN(h) * (1 + gamma(h)) + beta(h),  gamma, beta = conv3(ReLU(conv3(h -> hidden)))

"Switchable" means every normalisation layer owns one SPADE unit per modality; the target
modality picks the branch, so one generator translates into every target.

Shapes (``N`` batch, ``C`` latent channels, ``H x W x D`` latent grid)::

    MSSPADEGenerator(z: (N, C, H, W, D), target) -> (N, C, H, W, D)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.spade_norm import SPADE as _MonaiSPADE

__all__ = ["SelfSPADE", "SwitchableSPADE", "SPADEResBlock", "MSSPADEGenerator"]


class SelfSPADE(_MonaiSPADE):
    """SPADE unit modulated by its own input, with a ReLU hidden activation.

    MONAI's :class:`monai.networks.blocks.spade_norm.SPADE` has the same layers (parameter-free
    norm, shared conv, gamma conv, beta conv) but differs from the ALDM v1 unit in two places,
    both rebuilt here: its shared conv is followed by LeakyReLU(0.01) (v1: ReLU), and its gamma
    and beta ``Convolution`` blocks keep MONAI's default instance norm on their outputs (v1: plain
    convolutions with bias).

    Args:
        channels: channels of ``h`` (both the modulation input and the normalised tensor).
        hidden_channels: width of the shared conv (64 in the paper / v1).
        kernel_size: kernel of the three convolutions (3 in v1).
        spatial_dims: 3 for volumes.
        norm: parameter-free normalisation (instance norm without affine in v1).

    Shape: ``(N, channels, *spatial) -> (N, channels, *spatial)``.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 64,
        kernel_size: int = 3,
        spatial_dims: int = 3,
        norm: str | tuple = "INSTANCE",
    ) -> None:
        super().__init__(
            label_nc=channels,
            norm_nc=channels,
            kernel_size=kernel_size,
            spatial_dims=spatial_dims,
            hidden_channels=hidden_channels,
            norm=norm,
        )
        self.mlp_shared = Convolution(
            spatial_dims=spatial_dims,
            in_channels=channels,
            out_channels=hidden_channels,
            kernel_size=kernel_size,
            norm=None,
            act="RELU",
        )
        self.mlp_gamma = Convolution(
            spatial_dims=spatial_dims, in_channels=hidden_channels, out_channels=channels,
            kernel_size=kernel_size, norm=None, act=None,
        )
        self.mlp_beta = Convolution(
            spatial_dims=spatial_dims, in_channels=hidden_channels, out_channels=channels,
            kernel_size=kernel_size, norm=None, act=None,
        )

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | None = None) -> torch.Tensor:
        """Modulate ``x`` by itself (``segmap`` defaults to ``x``)."""
        return super().forward(x, x if segmap is None else segmap)


class SwitchableSPADE(nn.Module):
    """One :class:`SelfSPADE` per modality; ``forward(x, modality)`` uses that modality's branch.

    Shape: ``(N, channels, *spatial) -> (N, channels, *spatial)``.
    """

    def __init__(
        self, channels: int, modalities: Sequence[str], hidden_channels: int = 64, spatial_dims: int = 3
    ) -> None:
        super().__init__()
        if len(modalities) == 0 or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be non-empty and unique, got {list(modalities)}")
        self.branches = nn.ModuleDict(
            {m: SelfSPADE(channels, hidden_channels=hidden_channels, spatial_dims=spatial_dims) for m in modalities}
        )

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.branches:
            raise KeyError(f"unknown modality {modality!r}; this network knows {list(self.branches)}")
        return self.branches[modality](x)


class SPADEResBlock(nn.Module):
    """SPADE residual block of v1 with switchable norms.

    Main path: ``conv3(LReLU0.2(SPADE_0(x)))`` then ``conv3(LReLU0.2(SPADE_1(.)))`` with
    ``f_mid = min(f_in, f_out)``; shortcut: bias-free 1x1 conv when ``f_in != f_out``, else identity.

    Shape: ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modalities: Sequence[str],
        hidden_channels: int = 64,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        mid = min(in_channels, out_channels)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.norm_0 = SwitchableSPADE(in_channels, modalities, hidden_channels, spatial_dims)
        self.conv_0 = conv(in_channels, mid, kernel_size=3, padding=1)
        self.norm_1 = SwitchableSPADE(mid, modalities, hidden_channels, spatial_dims)
        self.conv_1 = conv(mid, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            conv(in_channels, out_channels, kernel_size=1, bias=False) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        h = self.conv_0(F.leaky_relu(self.norm_0(x, modality), 0.2))
        h = self.conv_1(F.leaky_relu(self.norm_1(h, modality), 0.2))
        return self.shortcut(x) + h


class MSSPADEGenerator(nn.Module):
    """Multi-switchable SPADE generator of ALDM (v1 layout, ``nf = 64``).

    ``x = SPADEResBlock(C -> nf)(z) + conv3(C -> nf)(z)``;
    ``out = SPADEResBlock(nf -> C)(x) + conv3(nf -> C)(x)``. The latent shape is kept, so the
    output feeds the frozen decoder (``post_quant_conv``) or the diffusion UNet's concat input.

    Args:
        modalities: names of the modalities, one SPADE branch each (e.g. ``["t1", "t1ce", "t2", "flair"]``).
        in_channels: latent channels (the VQ-GAN ``embed_dim``, 3 in ALDM).
        nf: width of the inner block (64 paper/v1; 8 in the tiny test configuration).
        hidden_channels: hidden width of every SPADE unit (64 paper/v1).
        spatial_dims: 3 for volumes.

    Forward: ``forward(z, target)`` where ``target`` is a modality name applied to the whole
    batch, or a sequence of ``N`` names (one per sample). Shape ``(N, C, H, W, D) -> (N, C, H, W, D)``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_channels: int = 3,
        nf: int = 64,
        hidden_channels: int = 64,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.block_0 = SPADEResBlock(in_channels, nf, self.modalities, hidden_channels, spatial_dims)
        self.skip_0 = conv(in_channels, nf, kernel_size=3, padding=1)
        self.block_1 = SPADEResBlock(nf, in_channels, self.modalities, hidden_channels, spatial_dims)
        self.skip_1 = conv(nf, in_channels, kernel_size=3, padding=1)

    def _single(self, z: torch.Tensor, target: str) -> torch.Tensor:
        x = self.block_0(z, target) + self.skip_0(z)
        return self.block_1(x, target) + self.skip_1(x)

    def forward(self, z: torch.Tensor, target: str | Sequence[str]) -> torch.Tensor:
        if isinstance(target, str):
            return self._single(z, target)
        targets = list(target)
        if len(targets) != z.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {z.shape[0]}")
        if len(set(targets)) == 1:
            return self._single(z, targets[0])
        # instance norm is per sample, so running samples of different targets apart is exact
        return torch.cat([self._single(z[i : i + 1], t) for i, t in enumerate(targets)], dim=0)
