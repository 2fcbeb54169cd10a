"""Latent diffusion UNet of ALDM, built from MONAI's ``DiffusionModelUNet``.

Source: Kim & Park, WACV 2024 (arXiv 2311.00265) and the official code jongdory/ALDM
(v1 ``LDM/configs/latent-diffusion/brats-ldm-vq-4.yaml``; v2 for the class-embedding variant).

Input: ``concat[z_src, SPADE_tgt(z_src), z_t]`` along channels, i.e. ``3 * embed_dim`` = 9
channels (the paper figure shows only ``[SPADE_tgt(z_src), z_t]``; the v1 code also concatenates
the untranslated ``z_src`` and we follow the code). Output: the epsilon prediction,
``embed_dim`` channels.

Target condition:

- ``conditioning="cross_attention"`` (paper / v1): cross-attention on a one-hot target vector,
  context shape ``(N, 1, M)`` for ``M`` modalities. With a single context token the softmax
  weight is 1, so each transformer block adds a learned per-target vector; that is the
  behaviour of the original design, not a defect.
- ``conditioning="class_embed"`` (v2): ``num_class_embeds = M`` (an embedding added to the time
  embedding), self-attention only; ``class_labels`` of shape ``(N,)``.

Shapes::

    unet(x: (N, 3*E, H, W, D), timesteps: (N,), context=(N, 1, M) | class_labels=(N,)) -> (N, E, H, W, D)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

__all__ = ["ALDM_UNET_PRESETS", "aldm_diffusion_unet", "target_condition"]

# channels / attention levels / head width / GroupNorm groups per scale (spec table §2, §10):
# paper [128, 256, 512] (paper), light [128, 128, 256] (v1), tiny for CPU tests.
# Attention at levels 1 and 2 = LDM ``attention_resolutions [4, 2]``; MONAI always adds
# attention to the middle block.
ALDM_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "channels": (128, 256, 512),
        "attention_levels": (False, True, True),
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 32,
    },
    "light": {
        "channels": (128, 128, 256),
        "attention_levels": (False, True, True),
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 32,
    },
    "tiny": {
        "channels": (16, 32),
        "attention_levels": (False, True),
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 8,
    },
}


def aldm_diffusion_unet(
    num_modalities: int,
    embed_dim: int = 3,
    scale: str | Mapping[str, Any] = "paper",
    conditioning: str = "cross_attention",
    **overrides: Any,
) -> DiffusionModelUNet:
    """The ALDM latent UNet for ``num_modalities`` targets and ``embed_dim``-channel latents.

    Args:
        num_modalities: ``M``, the size of the one-hot target vector / number of class embeddings.
        embed_dim: latent channels of the VQ-GAN (3 in ALDM); input has ``3 * embed_dim`` channels.
        scale: ``"paper"``, ``"light"`` or ``"tiny"`` (see ``ALDM_UNET_PRESETS``), or a mapping of the
            preset's keys (``channels``, ``attention_levels``, ``num_res_blocks``, ``num_head_channels``,
            ``norm_num_groups``), e.g. a demo overlay's own width.
        conditioning: ``"cross_attention"`` (paper / v1) or ``"class_embed"`` (v2).
        overrides: any other ``DiffusionModelUNet`` argument (``channels``, ``attention_levels``, ...).
    """
    if isinstance(scale, Mapping):
        unknown = sorted(set(scale) - set(ALDM_UNET_PRESETS["paper"]))
        if unknown:
            raise ValueError(f"unknown scale keys {unknown}; expected some of {sorted(ALDM_UNET_PRESETS['paper'])}")
        preset = dict(scale)
    elif scale in ALDM_UNET_PRESETS:
        preset = dict(ALDM_UNET_PRESETS[scale])
    else:
        raise ValueError(f"scale must be one of {sorted(ALDM_UNET_PRESETS)} or a mapping of their keys, got {scale!r}")
    if conditioning not in ("cross_attention", "class_embed"):
        raise ValueError(f"conditioning must be 'cross_attention' or 'class_embed', got {conditioning!r}")
    kwargs: dict[str, Any] = preset
    kwargs.update(
        spatial_dims=3,
        in_channels=3 * embed_dim,
        out_channels=embed_dim,
        resblock_updown=False,  # conv up/downsampling as in LDM
        transformer_num_layers=1,
    )
    if conditioning == "cross_attention":
        kwargs.update(with_conditioning=True, cross_attention_dim=num_modalities, num_class_embeds=None)
    else:
        kwargs.update(with_conditioning=False, cross_attention_dim=None, num_class_embeds=num_modalities)
    kwargs.update(overrides)
    for key in ("channels", "attention_levels"):
        kwargs[key] = tuple(kwargs[key])
    return DiffusionModelUNet(**kwargs)


def target_condition(
    targets: str | Sequence[str],
    modalities: Sequence[str],
    conditioning: str = "cross_attention",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword arguments that condition the UNet on ``targets``.

    Returns ``{"context": (N, 1, M) one-hot float}`` for cross-attention or
    ``{"class_labels": (N,) long}`` for the class-embedding variant. A single name is broadcast
    to ``batch_size`` samples.
    """
    modalities = list(modalities)
    names = [targets] * (batch_size or 1) if isinstance(targets, str) else list(targets)
    unknown = [t for t in names if t not in modalities]
    if unknown:
        raise KeyError(f"unknown target modality {unknown}; configured modalities are {modalities}")
    idx = torch.tensor([modalities.index(t) for t in names], dtype=torch.long, device=device)
    if conditioning == "class_embed":
        return {"class_labels": idx}
    if conditioning != "cross_attention":
        raise ValueError(f"conditioning must be 'cross_attention' or 'class_embed', got {conditioning!r}")
    return {"context": F.one_hot(idx, len(modalities)).float().unsqueeze(1)}
