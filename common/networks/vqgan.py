"""One configurable 3D VQ-GAN autoencoder for ALDM (taming style) and NODDI-SR (CLDM style).

``VQGAN = encoder -> quant_conv (1x1) -> quantiser -> [latent module] -> post_quant_conv (1x1) -> decoder``

- ``style="taming"`` (ALDM, Kim & Park WACV 2024; official ``jongdory/ALDM`` v1
  ``VQ-GAN/taming/modules/diffusionmodules/model.py``): :class:`~common.networks.vqgan_blocks.TamingEncoder`
  / ``TamingDecoder``, gradient codebook :class:`~common.networks.quantizers.VectorQuantizer3D`
  (``beta`` on the commitment term) by default.
- ``style="cldm"`` (NODDI-SR; ``guchengzhong/CLDM`` with the medicaldiffusion 3D VQ-GAN,
  ``FirasGit/medicaldiffusion`` ``vq_gan_3d/model/vqgan.py``): ``CLDMEncoder`` / ``CLDMDecoder`` with
  replicate "same" padding, EMA codebook with data-dependent init and dead-code restart
  (:class:`~common.networks.quantizers.EMAVectorQuantizer`) by default.

Shapes (f = 2**(len(channel_mult) - 1), E = embed_dim):
    x:                     (B, in_channels, H, W, D)
    encode(x):             (B, E, H/f, W/f, D/f)  continuous pre-quantisation latent (CLDM ``E_pre``)
    quantize(z):           (z_q (B, E, H/f, W/f, D/f), vq_loss (), stats dict)
    encode_quantized(x):   (B, E, H/f, W/f, D/f)  quantised latent (ALDM ``E_q``)
    decode(z):             (B, out_channels, H, W, D) from a quantised (or SPADE-modulated) latent
    forward(x):            (reconstruction (B, out_channels, H, W, D), vq_loss (), stats dict)

The latent module (ALDM's MS-SPADE) sits between ``quantize`` and ``post_quant_conv``. It lives
outside this module, so stage-1 checkpoints hold only the autoencoder: either call
``decode(spade(encode_quantized(x)))`` or pass ``forward(x, latent_fn=spade)``.

Presets: :meth:`VQGAN.aldm` (``paper`` / ``light`` / ``tiny``) and :meth:`VQGAN.cldm`
(``paper`` / ``light`` / ``tiny``) with the numbers of the aldm_translation and noddi_sr specs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from .quantizers import EMAVectorQuantizer, VectorQuantizer3D
from .vqgan_blocks import CLDMDecoder, CLDMEncoder, SamePadConv3d, TamingDecoder, TamingEncoder

__all__ = ["VQGAN", "VQGANReconstruction"]

# (channels, channel_mult, num_res_blocks, num_mid_blocks, norm_num_groups, num_embeddings, embed_dim)
_ALDM_PRESETS: dict[str, dict[str, Any]] = {
    # paper: ch.ch_mult = [256, 512, 512] (the paper's "252" read as a typo), 2 mid ResBlocks (ours,
    # matches the paper's 237 M parameters), codebook 8192 x 3
    "paper": dict(channels=256, channel_mult=(1, 2, 2), num_res_blocks=2, num_mid_blocks=2, norm_num_groups=32,
                  num_embeddings=8192, embed_dim=3, z_channels=3),
    # light = official v1 code (brats_vqgan_stage1.yaml): ch 128, mult [1, 1, 2], 1 mid ResBlock
    "light": dict(channels=128, channel_mult=(1, 1, 2), num_res_blocks=2, num_mid_blocks=1, norm_num_groups=32,
                  num_embeddings=8192, embed_dim=3, z_channels=3),
    "tiny": dict(channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, num_mid_blocks=1, norm_num_groups=4,
                 num_embeddings=64, embed_dim=3, z_channels=3),
}

_CLDM_PRESETS: dict[str, dict[str, Any]] = {
    # CLDM train_vqgan.py arguments: n_hiddens 64, downsample 2 (one level), n_codes 8192, embedding_dim 8
    "paper": dict(channels=64, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=32, num_embeddings=8192,
                  embed_dim=8),
    "light": dict(channels=64, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=32, num_embeddings=8192,
                  embed_dim=8),
    # noddi_sr spec section 10, tiny: n_hiddens 8, K 64, embed 4, GN 4
    "tiny": dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, num_embeddings=64, embed_dim=4),
}


def _preset(presets: dict[str, dict[str, Any]], scale: str | Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of preset ``scale``, or ``scale`` itself when it is a mapping of :class:`VQGAN` arguments
    (names checked; e.g. a demo overlay's widths, or ``quantizer``)."""
    if isinstance(scale, Mapping):
        import inspect

        known = set(inspect.signature(VQGAN.__init__).parameters) - {"self", "style"}
        unknown = sorted(set(scale) - known)
        if unknown:
            examples = sorted(set().union(*presets.values()))
            raise ValueError(f"unknown scale keys {unknown}; expected VQGAN arguments, e.g. {examples}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in scale.items()}
    if scale not in presets:
        raise ValueError(f"scale must be one of {sorted(presets)} or a mapping of their keys, got {scale!r}")
    return dict(presets[scale])


class VQGAN(nn.Module):
    """Configurable 3D VQ-GAN autoencoder (encoder, codebook, decoder).

    Args:
        style: ``"taming"`` (ALDM) or ``"cldm"`` (NODDI-SR), see the module docstring.
        spatial_dims: 3 (``taming`` also accepts 2).
        in_channels, out_channels: image channels (ALDM 1; NODDI 3 maps).
        channels: base width (taming ``ch``, CLDM ``n_hiddens``).
        channel_mult: width multiplier per level; ``len - 1`` downsamplings by 2.
        num_res_blocks: encoder ResBlocks per level (the decoder has one more).
        num_mid_blocks: taming mid-block ResBlocks (ignored by ``cldm``, which has none).
        z_channels: taming encoder output channels before ``quant_conv`` (ignored by ``cldm``).
        embed_dim: codebook vector size E (latent channels).
        num_embeddings: codebook size K.
        norm_num_groups, norm_eps: GroupNorm settings.
        quantizer: ``"vq"`` (:class:`VectorQuantizer3D`) or ``"ema"`` (:class:`EMAVectorQuantizer`);
            default ``"vq"`` for taming, ``"ema"`` for cldm.
        beta: commitment weight (both quantisers).
        ema_decay, restart_threshold, ema_data_init: :class:`EMAVectorQuantizer` settings.
        padding_mode: ``cldm`` padding ("replicate").
        upsample_keeps_width: ``cldm`` decoder widths, see :class:`CLDMDecoder`.
        checkpointing: ``taming`` only: activation checkpointing of every encoder/decoder block in training
            (same outputs and gradients; activation memory of a 192x192x144 paper-scale step from about
            246 GiB down to what ``benchmarks/aldm_activation_memory.py`` prints).
    """

    def __init__(
        self,
        style: str = "taming",
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2),
        num_res_blocks: int = 2,
        num_mid_blocks: int = 1,
        z_channels: int = 3,
        embed_dim: int = 3,
        num_embeddings: int = 8192,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        quantizer: str | None = None,
        beta: float = 0.25,
        ema_decay: float = 0.99,
        restart_threshold: float | None = 1.0,
        ema_data_init: bool = True,
        padding_mode: str = "replicate",
        upsample_keeps_width: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        style = style.lower()
        out_channels = in_channels if out_channels is None else out_channels
        self.style = style
        self.spatial_dims = spatial_dims
        self.embed_dim = int(embed_dim)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        if style == "taming":
            self.encoder: nn.Module = TamingEncoder(
                spatial_dims, in_channels, channels, channel_mult, num_res_blocks, num_mid_blocks, z_channels,
                norm_num_groups, norm_eps, checkpointing,
            )
            self.decoder: nn.Module = TamingDecoder(
                spatial_dims, z_channels, channels, channel_mult, num_res_blocks, num_mid_blocks, out_channels,
                norm_num_groups, norm_eps, checkpointing,
            )
            self.quant_conv: nn.Module = Convolution(spatial_dims, z_channels, embed_dim, kernel_size=1, conv_only=True)
            self.post_quant_conv: nn.Module = Convolution(
                spatial_dims, embed_dim, z_channels, kernel_size=1, conv_only=True
            )
        elif style == "cldm":
            if spatial_dims != 3:
                raise ValueError("the cldm style is 3D only (SamePadConv3d)")
            self.encoder = CLDMEncoder(
                in_channels, channels, channel_mult, num_res_blocks, norm_num_groups, norm_eps, padding_mode
            )
            self.decoder = CLDMDecoder(
                out_channels, channels, channel_mult, num_res_blocks, norm_num_groups, norm_eps, padding_mode,
                upsample_keeps_width,
            )
            # medicaldiffusion's pre_vq_conv / post_vq_conv are 1x1 same-padded convs (no padding at k1)
            self.quant_conv = SamePadConv3d(self.encoder.out_channels, embed_dim, 1, padding_mode=padding_mode)
            self.post_quant_conv = SamePadConv3d(embed_dim, self.decoder.in_channels, 1, padding_mode=padding_mode)
        else:
            raise ValueError(f"style must be 'taming' or 'cldm', got {style!r}")
        if checkpointing and style != "taming":
            raise ValueError("checkpointing is implemented for the taming style (ALDM) only")

        quantizer = ("vq" if style == "taming" else "ema") if quantizer is None else quantizer.lower()
        if quantizer == "vq":
            self.quantizer: nn.Module = VectorQuantizer3D(num_embeddings, embed_dim, beta=beta)
        elif quantizer == "ema":
            self.quantizer = EMAVectorQuantizer(
                num_embeddings, embed_dim, spatial_dims=spatial_dims, commitment_cost=beta, decay=ema_decay,
                restart_threshold=restart_threshold, data_init=ema_data_init,
            )
        else:
            raise ValueError(f"quantizer must be 'vq' or 'ema', got {quantizer!r}")

    # ---------------------------------------------------------------- presets
    @classmethod
    def aldm(cls, scale: str | Mapping[str, Any] = "paper", **overrides: Any) -> VQGAN:
        """ALDM taming-style VQ-GAN (aldm_translation spec section 2 table), f = 4, 1 channel in and out.

        ``paper``: ch 256, mult (1, 2, 2), 2 res blocks (decoder 3), 2 mid ResBlocks, GN 32, K 8192 x 3
        (encoder + decoder about 237.5 M parameters). ``light`` (official v1 code): ch 128, mult
        (1, 1, 2), 1 mid ResBlock. ``tiny``: ch 8, mult (1, 1, 2), 1 res block, GN 4, K 64 x 3.
        ``scale`` may also be a mapping of constructor arguments (the presets' ``channels``, ``channel_mult``,
        ``num_res_blocks``, ``num_mid_blocks``, ``norm_num_groups``, ``num_embeddings``, ``embed_dim``,
        ``z_channels``, or e.g. ``quantizer``), a demo overlay's own width; keys it leaves out keep the
        constructor defaults.
        ``overrides`` replace any constructor argument (e.g. ``quantizer="ema"``).
        """
        kwargs: dict[str, Any] = dict(style="taming", in_channels=1, out_channels=1)
        kwargs.update(_preset(_ALDM_PRESETS, scale))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def cldm(cls, scale: str = "paper", **overrides: Any) -> VQGAN:
        """NODDI-SR CLDM-style VQ-GAN (noddi_sr spec sections 2.2 and 10), f = 2, 3 maps in and out.

        ``paper``/``light``: n_hiddens 64, one downsampling level (64 -> 128), K 8192 x 8, GN 32, EMA
        codebook (3 x 64^3 -> 8 x 32^3). ``tiny``: n_hiddens 8, K 64 x 4, GN 4.
        """
        kwargs: dict[str, Any] = dict(style="cldm", in_channels=3, out_channels=3, quantizer="ema")
        kwargs.update(_preset(_CLDM_PRESETS, scale))
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---------------------------------------------------------------- parts
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent before quantisation (after ``quant_conv``): (B, E, *S/f)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantise a latent: ``(z_q, vq_loss, stats)``; an EMA codebook updates only in training mode."""
        return self.quantizer(z)

    def encode_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """ALDM ``E_q(x)``: the quantised latent (B, E, *S/f) (straight-through, differentiable in z)."""
        return self.quantize(self.encode(x))[0]

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Image from a latent (B, E, *S/f) through ``post_quant_conv`` and the decoder.

        ``z`` is normally already quantised or SPADE-modulated and is used as given. With
        ``quantize=True`` it is first snapped to the nearest codebook entries without any codebook
        update (CLDM's ``decode(quantize=True)`` for de-normalised diffusion samples).
        """
        if quantize:
            z = self.quantizer.lookup(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, latent_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(reconstruction, vq_loss, stats)``; ``latent_fn`` (e.g. SPADE_tgt) is applied to the quantised latent."""
        z_q, vq_loss, stats = self.quantize(self.encode(x))
        if latent_fn is not None:
            z_q = latent_fn(z_q)
        return self.decode(z_q), vq_loss, stats

    # ---------------------------------------------------------------- helpers
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (taming's adaptive GAN weight)."""
        return self.decoder.last_layer

    def codebook_mean_std(self) -> tuple[float, float]:
        """Mean and std over all codebook entries (NODDI-SR latent normalisation)."""
        return self.quantizer.codebook_mean_std()

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent (C, *S) of an input of spatial shape ``spatial_shape`` (each divisible by f)."""
        f = self.downsample_factor
        if any(int(s) % f for s in spatial_shape):
            raise ValueError(f"spatial shape {tuple(spatial_shape)} is not divisible by the downsampling factor {f}")
        return (self.embed_dim, *(int(s) // f for s in spatial_shape))

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of encoder, convs, codebook and decoder (the generator optimiser's)."""
        return [p for p in self.parameters() if p.requires_grad]


class VQGANReconstruction(nn.Module):
    """``x -> decode(quantise(encode(x)))``: a VQ-GAN as one network, for evaluating stage 1 with an inferer.

    ``per_channel=False``: ``(B, C, *S) -> (B, C, *S)`` with ``C`` the VQ-GAN's input channels (NODDI-SR's
    three maps). ``per_channel=True``: every channel is its own single-channel volume (ALDM's autoencoder,
    shared by all modalities): ``(B, M, *S)`` is run as ``(B * M, 1, *S)`` and reshaped back, so one call
    reconstructs every modality of a case.
    """

    def __init__(self, vqgan: nn.Module, per_channel: bool = False) -> None:
        super().__init__()
        self.vqgan, self.per_channel = vqgan, bool(per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return self.vqgan(x)[0]
        b, m = x.shape[:2]
        return self.vqgan(x.reshape(b * m, 1, *x.shape[2:]))[0].reshape(b, m, *x.shape[2:])
