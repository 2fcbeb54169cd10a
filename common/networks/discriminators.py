"""PatchGAN discriminators of the shared VQ-GAN, built from MONAI's ``PatchDiscriminator``.

- :func:`aldm_discriminator`: ALDM's 3D image (stage 1) or latent (stage 2) discriminator, the
  taming ``NLayerDiscriminator`` design (ndf 32, 3 layers, k4, LeakyReLU 0.2) with GroupNorm(32) as
  in ALDM v1 (aldm_translation spec section 2.3). MONAI's layer stack is 32 -> 64 -> 128 -> 256 with
  strides 2, 2, 2, 1 and a final conv; its constructor already draws conv weights from N(0, 0.02)
  (``monai.networks.utils.normal_init``), the taming initialisation.
- :func:`cldm_discriminators`: the medicaldiffusion/CLDM pair, a 2D discriminator on one slice per
  volume and a 3D one on the volume (pix2pixHD ``NLayerDiscriminator``: ndf 64, 3 layers, k4,
  padding 2, BatchNorm, LeakyReLU 0.2, conv biases). MONAI's final conv keeps padding 1 where
  medicaldiffusion uses 2; the noddi_sr spec accepts this (it changes the logit map size by one
  voxel per side, not the layer stack).
- :func:`random_slices`: one random slice per volume along the first spatial axis, drawn from a
  seeded ``torch.Generator`` (medicaldiffusion draws it from the global RNG).
- :func:`disc_logits`: the logit map of a discriminator output (``PatchDiscriminator`` returns
  the list of intermediate features with the logits last).

Shapes: 3D discriminator (B, C, H, W, D) -> logits (B, 1, h, w, d); 2D (B, C, H, W) -> (B, 1, h, w).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import PatchDiscriminator
from monai.networks.utils import normal_init

__all__ = ["aldm_discriminator", "cldm_discriminators", "random_slices", "disc_logits"]


def aldm_discriminator(
    in_channels: int = 1,
    channels: int = 32,
    num_layers_d: int = 3,
    norm_num_groups: int = 32,
    spatial_dims: int = 3,
) -> PatchDiscriminator:
    """ALDM 3D PatchGAN (image: ``in_channels=1``; latent: ``in_channels=embed_dim``).

    Paper scale: ``channels=32, num_layers_d=3, norm_num_groups=32`` (2.77 M parameters). Tiny
    configurations need fewer groups (every layer width must be divisible by ``norm_num_groups``)
    and, on an 8^3 latent, ``num_layers_d=1``.
    """
    disc = PatchDiscriminator(
        spatial_dims=spatial_dims,
        num_layers_d=num_layers_d,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        kernel_size=4,
        norm=("GROUP", {"num_groups": norm_num_groups}),
    )
    # MONAI already calls normal_init in the constructor; repeated here so the N(0, 0.02) conv
    # initialisation of taming's weights_init does not depend on that implementation detail
    disc.apply(normal_init)
    return disc


def cldm_discriminators(
    in_channels: int = 3, channels: int = 64, num_layers_d: int = 3, padding: int = 2
) -> tuple[PatchDiscriminator, PatchDiscriminator]:
    """The CLDM (2D slice, 3D volume) discriminator pair with BatchNorm; returns ``(disc_2d, disc_3d)``.

    Paper scale ``channels=64``; tiny ``channels=8`` (noddi_sr spec section 10).
    """
    kwargs: dict[str, Any] = dict(
        num_layers_d=num_layers_d,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        kernel_size=4,
        padding=padding,
        norm="BATCH",
        bias=True,
    )
    return PatchDiscriminator(spatial_dims=2, **kwargs), PatchDiscriminator(spatial_dims=3, **kwargs)


def random_slices(
    x: torch.Tensor, generator: torch.Generator | None = None, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One slice per volume along the first spatial axis: (B, C, H, W, D) -> ((B, C, W, D), index (B,)).

    ``index`` reuses given positions (to take the same slices of the real and the reconstructed
    volume); otherwise they are drawn uniformly with ``generator`` (on the CPU, so a CPU generator
    serves every device).
    """
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, H, W, D) volume, got shape {tuple(x.shape)}")
    if index is None:
        index = torch.randint(0, x.shape[2], (x.shape[0],), generator=generator)
    index = index.to(x.device)
    return x[torch.arange(x.shape[0], device=x.device), :, index], index


def disc_logits(output: Any) -> torch.Tensor:
    """Logits of a discriminator output: the last element of a list/tuple, or the tensor itself."""
    return output[-1] if isinstance(output, (list, tuple)) else output

