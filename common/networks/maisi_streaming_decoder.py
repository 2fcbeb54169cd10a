"""Whole-volume MAISI VAE decode in bounded memory: the same layers, computed slab by slab.

``AutoencoderKlMaisi.decode`` keeps several full-resolution activations alive at once (a 256 x 256 x 128 CT has
128-channel float32 activations of 4.3 GiB at the last level), so the whole-volume decode peaks near 15 GiB on a
CPU; MONAI's tensor splitting cuts each convolution's input but concatenates full outputs, and a sliding window
over the latent changes the result (every window normalises with its own GroupNorm statistics) and repeats work
in the overlaps. :func:`streaming_decode` runs the decoder's own modules with their own weights in an order that
never holds more than the input and the output of one residual block:

- GroupNorm statistics are accumulated over the whole volume (float64 sums per channel), so every voxel is
  normalised with the statistics of the whole-volume decode;
- each 3x3x3 convolution runs on slabs of ``chunk`` voxels along the last spatial axis with a one-voxel halo,
  GroupNorm + SiLU applied to the slab on the fly (both are voxel-wise once the statistics are known) and the
  zero padding added only at the volume's own border, written into a preallocated output;
- a residual block's second convolution adds into its input in place (the skip connection); a 1x1 shortcut
  (channel change) writes its output into the leading channels of the input it reads, slab by slab;
- the upsampling (trilinear x2 then 3x3x3 convolution) interpolates each slab with a one-voxel input halo,
  which gives the voxels the whole-volume interpolation gives.

The result equals ``autoencoder.decode_stage_2_outputs(z)`` up to float32 rounding (different summation order;
tested), for decoders built as the official MAISI configurations build them (``norm_float16`` off, as on a CPU;
no non-local attention, no transposed convolutions): other configurations raise ``ValueError``.

Shapes: ``z`` (N, latent_channels, x, y, z) -> (N, out_channels, 4x, 4y, 4z) for the two-upsampling CT VAE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["streaming_decode", "supports_streaming"]


def _conv3d(module: nn.Module) -> nn.Conv3d:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    if len(convs) != 1 or not isinstance(convs[0], nn.Conv3d):
        raise ValueError(f"{type(module).__name__}: expected one Conv3d, found {[type(c).__name__ for c in convs]}")
    c = convs[0]
    k = c.kernel_size
    if c.stride != (1, 1, 1) or c.dilation != (1, 1, 1) or c.groups != 1 or c.padding_mode != "zeros" or len(set(k)) != 1 \
            or k[0] % 2 == 0 or c.padding != tuple(kk // 2 for kk in k):
        raise ValueError(f"unsupported convolution for streaming decode: {c}")
    return c


def supports_streaming(autoencoder: nn.Module) -> bool:
    """Whether :func:`streaming_decode` can run this autoencoder's decoder (see the module docstring)."""
    try:
        _plan(autoencoder)
    except ValueError:
        return False
    return True


def _plan(autoencoder: nn.Module) -> list[tuple[str, tuple[nn.Module, ...]]]:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        MaisiConvolution,
        MaisiGroupNorm3D,
        MaisiResBlock,
        MaisiUpsample,
    )

    blocks = list(autoencoder.decoder.blocks)
    plan: list[tuple[str, tuple[nn.Module, ...]]] = []
    i = 0
    while i < len(blocks):
        b = blocks[i]
        if isinstance(b, MaisiGroupNorm3D) and i + 1 < len(blocks) and isinstance(blocks[i + 1], MaisiConvolution):
            if b.norm_float16:
                raise ValueError("norm_float16 decoders are not supported")
            plan.append(("norm_conv", (b, _conv3d(blocks[i + 1]))))
            i += 2
            continue
        if isinstance(b, MaisiConvolution):
            plan.append(("conv", (_conv3d(b),)))
        elif isinstance(b, MaisiResBlock):
            if b.norm1.norm_float16 or b.norm2.norm_float16:
                raise ValueError("norm_float16 decoders are not supported")
            short = None if isinstance(b.nin_shortcut, nn.Identity) else _conv3d(b.nin_shortcut)
            plan.append(("res", (b.norm1, _conv3d(b.conv1), b.norm2, _conv3d(b.conv2), short)))
        elif isinstance(b, MaisiUpsample):
            if b.use_convtranspose:
                raise ValueError("transposed-convolution upsampling is not supported")
            plan.append(("up", (_conv3d(b.conv),)))
        else:
            raise ValueError(f"decoder block {type(b).__name__} is not supported by the streaming decode")
        i += 1
    return plan


def _affine_norm(norm: nn.GroupNorm, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with ``norm(x) == x * scale + shift``, statistics over the whole of ``x``
    (one sample, shape (1, C, D, H, W)), accumulated slab by slab in float64."""
    c, g = x.shape[1], norm.num_groups
    s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[-1], chunk):
        slab = x[..., s : s + chunk].to(torch.float64)
        s1 += slab.sum(dim=(0, 2, 3, 4))
        s2 += slab.square().sum(dim=(0, 2, 3, 4))
    n = x[0, 0].numel() * (c // g)
    mean = s1.view(g, -1).sum(1) / n
    var = (s2.view(g, -1).sum(1) / n - mean.square()).clamp_min(0.0)
    inv = (var + norm.eps).rsqrt().repeat_interleave(c // g)
    mean = mean.repeat_interleave(c // g)
    w = norm.weight.double() if norm.affine else torch.ones_like(inv)
    b = norm.bias.double() if norm.affine else torch.zeros_like(inv)
    scale = (w * inv).to(x.dtype).view(1, c, 1, 1, 1)
    shift = (b - mean * w * inv).to(x.dtype).view(1, c, 1, 1, 1)
    return scale, shift


def _norm_fn(norm: nn.GroupNorm, x: torch.Tensor, chunk: int, silu: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    scale, shift = _affine_norm(norm, x, chunk)
    if silu:
        return lambda slab: F.silu(torch.addcmul(shift, slab, scale), inplace=True)
    return lambda slab: torch.addcmul(shift, slab, scale)


def _conv_slabs(
    conv: nn.Conv3d,
    x: torch.Tensor,
    chunk: int,
    pre: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """``conv(pre(x))`` (zero padding of the conv applied after ``pre``, as in the module), slab by slab along
    the last axis; written into (or, with ``accumulate``, added onto) ``out``."""
    p = conv.padding[2]
    w = x.shape[-1]
    if out is None:
        out = x.new_empty((x.shape[0], conv.out_channels, *x.shape[2:]))
    for s in range(0, w, chunk):
        e = min(w, s + chunk)
        lo, hi = max(0, s - p), min(w, e + p)
        slab = x[..., lo:hi]
        slab = pre(slab) if pre is not None else slab
        if (s - lo) < p or (hi - e) < p:
            slab = F.pad(slab, (p - (s - lo), p - (hi - e)))
        y = F.conv3d(slab, conv.weight, conv.bias, padding=(conv.padding[0], conv.padding[1], 0))
        if accumulate:
            out[..., s:e] += y
        else:
            out[..., s:e] = y
        del y, slab
    return out


def _upsample_conv(conv: nn.Conv3d, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="trilinear"))`` slab by slab (input halo of one voxel)."""
    n, _, d, h, w = x.shape
    p = conv.padding[2]
    out = x.new_empty((n, conv.out_channels, 2 * d, 2 * h, 2 * w))
    for s in range(0, w, chunk):
        e = min(w, s + chunk)
        lo, hi = max(0, s - 1), min(w, e + 1)
        up = F.interpolate(x[..., lo:hi], scale_factor=2.0, mode="trilinear")
        # upsampled voxels [2s - p, 2e + p) in slab coordinates, zero padding beyond the volume's border
        a, b = 2 * s - p - 2 * lo, 2 * e + p - 2 * lo
        pad_l, pad_r = max(0, -a), max(0, b - up.shape[-1])
        up = up[..., max(0, a) : min(up.shape[-1], b)]
        if pad_l or pad_r:
            up = F.pad(up, (pad_l, pad_r))
        out[..., 2 * s : 2 * e] = F.conv3d(up, conv.weight, conv.bias, padding=(conv.padding[0], conv.padding[1], 0))
        del up
    return out


def _res_block(parts, x: torch.Tensor, chunk: int) -> torch.Tensor:
    norm1, conv1, norm2, conv2, short = parts
    h = _conv_slabs(conv1, x, chunk, pre=_norm_fn(norm1, x, chunk, silu=True))
    pre2 = _norm_fn(norm2, h, chunk, silu=True)
    if short is None:
        _conv_slabs(conv2, h, chunk, pre=pre2, out=x, accumulate=True)  # x + conv2(...), in place
        return x
    c_out = short.out_channels
    if c_out > x.shape[1]:
        skip = _conv_slabs(short, x, chunk)
        del x
    else:  # the 1x1 shortcut's output overwrites the leading channels of its input, slab by slab
        for s in range(0, x.shape[-1], chunk):
            x[:, :c_out, ..., s : s + chunk] = F.conv3d(x[..., s : s + chunk], short.weight, short.bias)
        skip = x[:, :c_out]
    _conv_slabs(conv2, h, chunk, pre=pre2, out=skip, accumulate=True)
    del h
    out = skip.clone()  # its own storage, so the input's (more channels) is freed
    del skip, x
    return out


@torch.no_grad()
def streaming_decode(autoencoder: nn.Module, z: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``autoencoder.decode_stage_2_outputs(z)`` in bounded memory (module docstring); one sample at a time.

    Args:
        autoencoder: a MONAI ``AutoencoderKlMaisi`` (its ``post_quant_conv`` and ``decoder.blocks``).
        z: latent (N, C, x, y, z), already divided by the diffusion scale factor.
        chunk: slab thickness along the last axis, in voxels of the layer being computed.
    """
    plan = _plan(autoencoder)
    pq = _conv3d(autoencoder.post_quant_conv)
    z = z.as_tensor() if hasattr(z, "as_tensor") else z  # MetaTensor: plain tensor arithmetic below
    outs = []
    for i in range(z.shape[0]):
        x = F.conv3d(z[i : i + 1].to(pq.weight.dtype), pq.weight, pq.bias)
        for kind, parts in plan:
            if kind == "conv":
                x = _conv_slabs(parts[0], x, chunk)
            elif kind == "norm_conv":
                x = _conv_slabs(parts[1], x, chunk, pre=_norm_fn(parts[0], x, chunk, silu=False))
            elif kind == "res":
                x = _res_block(parts, x, chunk)
            else:
                x = _upsample_conv(parts[0], x, chunk)
        outs.append(x)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
