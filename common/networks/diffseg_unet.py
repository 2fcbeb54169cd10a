"""Time-conditioned 3D UNet of ImgX-DiffSeg (paper A, ``Unet3dTime``).

Re-implemented in PyTorch after the description of Fu et al., arXiv 2303.06040 and the module
layout of the official JAX code (``mathpluscode/ImgX-DiffSeg`` tag v0.1.0,
``imgx/model/unet_3d_time.py`` and ``basic.py``); no code is copied.

Shapes (``n_img`` image channels, ``C`` classes, spatial size divisible by 16)::

    diffusion:  x (B, n_img + C, H, W, D) = concat[image, x_t],  t (B,) int  ->  logits (B, C, H, W, D)
    baseline:   x (B, n_img, H, W, D)                                        ->  logits (B, C, H, W, D)

Encoder: stem conv3-IN-GELU to ``channels[0]`` and one TimeResBlock, then for every entry of
``channels`` a strided conv (k2 s2) + IN followed by a TimeResBlock: four halvings for four
entries, the bottom at 1/16 resolution. Decoder: transposed conv (k2 s2) to the channels of the
skip one level up, crop to the skip, **add** the skip, TimeResBlock; a final 1x1x1 conv gives the
C logits. The step index is embedded with the sinusoid of DDPM (dimension ``4 * channels[0]``,
[cos, sin], max period 10 000) and every block has its own linear projection of GELU(embedding).
"""

# no `from __future__ import annotations`: torch.jit.script (the zoo's export) cannot resolve string annotations
# of @torch.jit.unused methods
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch.utils.checkpoint import checkpoint

__all__ = ["TimeResBlock", "DiffSegUNet"]


class _InstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm with affine parameters that accepts a single voxel per channel.

    PyTorch refuses instance statistics over one element; mathematically the normalised value is
    0, so the output is the bias (as in the official JAX/Haiku code). A 16^3 input reaches the
    bottom of the UNet as 1x1x1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0].numel() == 1:
            bias = self.bias if self.bias is not None else torch.zeros(x.shape[1], device=x.device)
            # a list shape and no super() call: torch.jit.script (the zoo's export) supports neither
            # *-unpacking nor super()
            return torch.zeros_like(x) + bias.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
        return self._apply_instance_norm(x)


class TimeResBlock(nn.Module):
    """``h = IN(conv(GELU(IN(conv(x)))) + Linear(GELU(t_emb)))``; ``out = GELU(h + x)``.

    Shapes: x (B, ch, *S), t_emb (B, t_dim) or None -> (B, ch, *S). Convolutions have no bias
    (followed by instance norm with affine parameters, as in the official code).
    """

    def __init__(self, channels: int, time_dim: int | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = _InstanceNorm3d(channels, affine=True)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _InstanceNorm3d(channels, affine=True)
        self.time_proj = nn.Linear(time_dim, channels) if time_dim else None

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None, checkpointed: bool = False) -> torch.Tensor:
        if checkpointed:
            return self._checkpointed(x, t_emb)
        h = F.gelu(self.norm1(self.conv1(x)))
        h = self.conv2(h)
        if self.time_proj is not None and t_emb is not None:
            h = h + self.time_proj(F.gelu(t_emb))[:, :, None, None, None].to(h.dtype)
        h = self.norm2(h)
        return F.gelu(h + x)

    @torch.jit.unused
    def _checkpointed(self, x: torch.Tensor, t_emb: torch.Tensor | None) -> torch.Tensor:
        # training only; torch.jit.script cannot compile checkpoint(), so the scripted module leaves it out
        return checkpoint(self, x, t_emb, use_reentrant=False)


class _Down(nn.Module):
    """Strided conv (k2 s2, no bias) + IN: halves every spatial size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 2, stride=2, bias=False)
        self.norm = _InstanceNorm3d(out_ch, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop the trailing spatial dims of ``x`` to those of ``ref`` (no-op for sizes divisible by 16)."""
    # narrow per axis rather than a starred slice tuple, which torch.jit.script cannot compile; only where the
    # sizes differ, so a trace at sizes divisible by 16 holds no shape constant (OpenVINONetwork's shape_multiple)
    for d in range(2, ref.dim()):
        if x.shape[d] > ref.shape[d]:
            x = x.narrow(d, 0, ref.shape[d])
    return x


class DiffSegUNet(nn.Module):
    """Time-conditioned 3D UNet predicting C mask logits (x0 parameterisation).

    Args:
        in_channels: ``n_img + C`` with time conditioning (diffusion), ``n_img`` for the baseline.
        out_channels: number of classes C (background included).
        channels: widths of the four levels (paper A: (32, 64, 128, 256)).
        time_conditioning: embed the step index ``t`` (False for the non-diffusion baseline).
        use_checkpointing: activation checkpointing of every block in training (official "remat").
        max_period: period parameter of the sinusoidal embedding.

    ``forward(x, t=None)``: ``t`` is an int or a ``(B,)`` tensor of step indices; ``None`` means
    step 0, so ``monai.bundle verify_net_in_out`` can call the network with the image tensor only.
    """

    time_dim: int | None  # None for the baseline; declared so torch.jit.script does not type it NoneType

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        time_conditioning: bool = True,
        use_checkpointing: bool = False,
        max_period: int = 10_000,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.time_conditioning = bool(time_conditioning)
        self.use_checkpointing = bool(use_checkpointing)
        self.max_period = int(max_period)
        self.time_dim = 4 * channels[0] if self.time_conditioning else None
        self.divisor = 2 ** len(channels)

        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, channels[0], 3, padding=1, bias=False),
            _InstanceNorm3d(channels[0], affine=True),
            nn.GELU(),
        )
        self.stem_block = TimeResBlock(channels[0], self.time_dim)
        self.downs = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        prev = channels[0]
        for ch in channels:
            self.downs.append(_Down(prev, ch))
            self.enc_blocks.append(TimeResBlock(ch, self.time_dim))
            prev = ch
        # skips, finest first: stem (channels[0]), then the outputs of all but the last level
        skip_channels = [channels[0]] + channels[:-1]
        self.ups = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for ch in reversed(skip_channels):
            self.ups.append(nn.ConvTranspose3d(prev, ch, 2, stride=2))
            self.dec_blocks.append(TimeResBlock(ch, self.time_dim))
            prev = ch
        self.out = nn.Conv3d(prev, out_channels, 1)

    def embed_time(self, t: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Sinusoidal embedding ``(B, 4 * channels[0])`` of the integer step index, or None for the baseline."""
        time_dim = self.time_dim  # a local, so torch.jit.script refines int | None to int below
        if not self.time_conditioning or time_dim is None:
            return None
        # isinstance refinement rather than torch.is_tensor: torch.jit.script refines Union types only this way
        if t is None:
            steps = torch.zeros((batch,), device=device, dtype=torch.long)
        elif isinstance(t, int):
            steps = torch.full((batch,), t, device=device, dtype=torch.long)
        elif t.ndim == 0:
            steps = torch.full((batch,), int(t), device=device, dtype=torch.long)
        else:
            steps = t
        return get_timestep_embedding(steps.to(device), time_dim, self.max_period)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        t_emb = self.embed_time(t, x.shape[0], x.device)
        ckpt = self.use_checkpointing and self.training and torch.is_grad_enabled()
        h = self.stem_block(self.stem(x), t_emb, ckpt)
        skips = [h]
        for down, block in zip(self.downs, self.enc_blocks):
            h = block(down(h), t_emb, ckpt)
            skips.append(h)
        skips.pop()  # the bottom level is not a skip
        for up, block in zip(self.ups, self.dec_blocks):
            skip = skips.pop()
            h = _crop_to(up(h), skip) + skip
            h = block(h, t_emb, ckpt)
        return self.out(h)
