"""NODDI-SR stages 2 (condition encoder) and 3 (latent diffusion), and the sampling model used at inference.

Method: noddi_sr spec §2.5, §3, §4 (CLDM, ``guchengzhong/CLDM`` ``train_lr_encoder.py``, ``ddpm.py``; re-implemented).
Stage 1 (the VQ-GAN on the HR maps) is ``common.engines.vqgan_step.VQGANTrainingStep``.

Batches hold the LR features under ``image`` (B, C_feat, x, y, z) and the HR maps under ``noddi`` (B, 3, 2x, 2y, 2z).

Stage 2, :class:`CondEncoderStep` (the VQ-GAN is frozen)::

    L = L1(Enc(f_LR), E_pre(x_HR))          E_pre = VQ-GAN ``encode`` (pre-quantisation latent, not normalised)

Stage 3, :class:`LatentDiffusionStep` (VQ-GAN and encoder frozen; only the UNet learns, its EMA follows)::

    z0 = norm(E_pre(x_HR)), c = norm(Enc(f_LR)), norm(z) = (z - mu_cb) / sigma_cb
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    L = L1(UNet(cat[c, z_t], t), eps)

The condition comes first in the concatenation (the shared sampler :class:`common.inferers.latent_diffusion.
LatentDiffusionSampler` feeds ``cat[cond, z_t]``); CLDM orders them the other way, which is only a permutation of the
UNet's first-layer input channels. mu_cb, sigma_cb (mean and std over all codebook entries, CLDM ``norm_z``) are frozen
in a :class:`LatentNormalizer` whose buffers travel with the stage-3 checkpoints (the official code recomputes them from
a codebook that may still be training, spec §8.9).

EMA (spec §3): decay 0.995 from step ``ema_start`` (2000), updated every ``ema_every`` (10) steps; before that the EMA is
a copy of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference

from common.engines.trainers import TrainingStep, autocast, engine_device, freeze, optimizer_step

__all__ = [
    "LatentNormalizer",
    "CondEncoderStep",
    "LatentDiffusionStep",
    "NODDISRModel",
    "NODDISRInferer",
]


class LatentNormalizer(nn.Module):
    """z ↦ (z − μ) / σ with frozen scalars μ, σ stored as buffers (saved and reloaded with the checkpoints).

    ``LatentNormalizer.from_vqgan(vqgan)`` takes μ, σ = mean and std over all entries of the trained codebook.
    Shape: any → same.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float64))

    @classmethod
    def from_vqgan(cls, vqgan: nn.Module) -> LatentNormalizer:
        mean, std = vqgan.codebook_mean_std()
        return cls(float(mean), float(std))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.dtype)) / self.std.to(z.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)


class CondEncoderStep(TrainingStep):
    """Stage 2: L1 between the condition encoder's output and the frozen VQ-GAN's pre-quantisation latent.

    Args:
        encoder: :class:`common.networks.lr_encoder.LREncoder`.
        vqgan: stage-1 :class:`common.networks.vqgan.VQGAN` (frozen here).
        optimizer: optimiser of the encoder (AdamW 1e-4, weight decay 5e-5).
        image_key, target_key: batch keys of the LR features and the HR maps.

    Returns ``{"loss", "loss_l1"}``.
    """

    def __init__(self, encoder: nn.Module, vqgan: nn.Module, optimizer: torch.optim.Optimizer, image_key: str = "image", target_key: str = "noddi") -> None:
        self.encoder, self.vqgan, self.optimizer = encoder, vqgan, optimizer
        self.image_key, self.target_key = image_key, target_key
        freeze(vqgan)

    def __call__(self, engine: Any, batch: dict) -> dict[str, Any]:
        device = engine_device(engine)
        f = batch[self.image_key].to(device).float()
        x = batch[self.target_key].to(device).float()
        self.encoder.train()
        self.vqgan.eval()
        with torch.no_grad():
            target = self.vqgan.encode(x)
        with autocast(engine):
            pred = self.encoder(f)
        loss = F.l1_loss(pred.float(), target.float())
        optimizer_step(engine, loss, self.optimizer)
        return self.detach({"loss": loss, "loss_l1": loss})


class LatentDiffusionStep(TrainingStep):
    """Stage 3: noise-prediction training of the latent UNet with concatenated conditioning, L1 on the noise.

    Args:
        unet: MONAI ``DiffusionModelUNet`` with ``in_channels = 2 E``, ``out_channels = E``.
        encoder: stage-2 condition encoder (frozen). vqgan: stage-1 VQ-GAN (frozen).
        latent_norm: :class:`LatentNormalizer` (frozen codebook statistics).
        scheduler: MONAI ``DDPMScheduler`` (T = 1000, scaled-linear 1e-4 … 2e-2, ``clip_sample=False``).
        optimizer: optimiser of the UNet.
        ema: :class:`common.engines.ema.EMA` of the UNet (decay 0.995, ``warmup=False``) or None.
        ema_start, ema_every: EMA schedule (spec §3: 2000, 10).

    Returns ``{"loss", "loss_l1_eps"}``.
    """

    def __init__(
        self,
        unet: nn.Module,
        encoder: nn.Module,
        vqgan: nn.Module,
        latent_norm: LatentNormalizer,
        scheduler: Any,
        optimizer: torch.optim.Optimizer,
        ema: nn.Module | None = None,
        ema_start: int = 2000,
        ema_every: int = 10,
        image_key: str = "image",
        target_key: str = "noddi",
    ) -> None:
        self.unet, self.encoder, self.vqgan, self.latent_norm = unet, encoder, vqgan, latent_norm
        self.scheduler, self.optimizer, self.ema = scheduler, optimizer, ema
        self.ema_start, self.ema_every = int(ema_start), max(int(ema_every), 1)
        self.image_key, self.target_key = image_key, target_key
        freeze(vqgan, encoder)

    def _update_ema(self, iteration: int) -> None:
        if self.ema is None or iteration % self.ema_every:
            return
        unet = self.unet.module if isinstance(self.unet, nn.parallel.DistributedDataParallel) else self.unet
        if iteration < self.ema_start:
            self.ema.module.load_state_dict(unet.state_dict())
        else:
            self.ema.update(unet)

    def __call__(self, engine: Any, batch: dict) -> dict[str, Any]:
        device = engine_device(engine)
        f = batch[self.image_key].to(device).float()
        x = batch[self.target_key].to(device).float()
        self.unet.train()
        with torch.no_grad():
            z0 = self.latent_norm(self.vqgan.encode(x))
            c = self.latent_norm(self.encoder(f))
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), device=device, dtype=torch.long)
        zt = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        with autocast(engine):
            eps = self.unet(torch.cat([c, zt], dim=1), t)
        loss = F.l1_loss(eps.float(), noise)
        optimizer_step(engine, loss, self.optimizer)
        self._update_ema(int(engine.state.iteration))
        return self.detach({"loss": loss, "loss_l1_eps": loss})


class NODDISRModel(nn.Module):
    """The three trained stages and the frozen latent statistics, as one module (one inference checkpoint).

    - ``forward(f)``: the deterministic path decode(quantise(Enc(f))) (stage-2 validation; exportable by tracing);
    - ``sample(f, sampler, noise)``: the diffusion path: c = norm(Enc(f)), z̃ ~ DDIM(UNet | c) from ``noise``,
      z = z̃ σ + μ, quantised to the nearest code (CLDM ``decode(quantize=True)``), decoded.

    Both return maps (B, 3, s x, s y, s z) clipped to [0, 1] for features f (B, C_feat, x, y, z); s = 2 (the
    encoder upsamples by 2 onto the latent grid, the VQ-GAN decoder by 2 onto the HR grid).

    Args:
        vqgan: :class:`common.networks.vqgan.VQGAN`; encoder: :class:`common.networks.lr_encoder.LREncoder`;
        unet: the latent denoiser (None for the stage-2 deterministic path); latent_norm: :class:`LatentNormalizer`.
        quantize: snap latents to the codebook before decoding.
    """

    def __init__(
        self,
        vqgan: nn.Module,
        encoder: nn.Module,
        unet: nn.Module | None = None,
        latent_norm: LatentNormalizer | None = None,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.vqgan, self.encoder, self.unet = vqgan, encoder, unet
        self.latent_norm = latent_norm if latent_norm is not None else LatentNormalizer()
        self.quantize = quantize

    def condition(self, f: torch.Tensor) -> torch.Tensor:
        return self.latent_norm(self.encoder(f))

    def decode(self, z_norm: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(self.latent_norm.inverse(z_norm), quantize=self.quantize).clamp(0.0, 1.0)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(self.encoder(f), quantize=self.quantize).clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(self, f: torch.Tensor, sampler: Any, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.unet is None:
            raise RuntimeError("NODDISRModel.sample needs the latent UNet (stage 3)")
        c = self.condition(f)
        if noise is None:
            noise = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        return self.decode(sampler(c, self.unet, noise=noise))


class NODDISRInferer(Inferer):
    """Whole-volume NODDI-SR inference: sliding windows over the LR features with a ×``scale`` output zoom.

    LR patches of ``roi_size`` (32³) with ``overlap`` (0.4375 = stride 18, spec §4) are mapped to HR patches by the
    network (``sample`` with ``sampler``, or the deterministic ``forward`` when ``sampler`` is None) and stitched by
    uniform averaging (``mode="constant"``); MONAI pads volumes smaller than a patch and crops the padding back.
    The initial noise of every patch comes from one generator seeded with ``seed`` per call, so a case is
    reproducible. ``num_samples`` > 1 returns the mean over samples and keeps their std in ``self.last_std``.

    Call: ``inferer(features (B, C_feat, X, Y, Z), network: NODDISRModel) -> (B, 3, sX, sY, sZ)``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = 32,
        sw_batch_size: int = 1,
        overlap: float = 0.4375,
        sampler: Any = None,
        seed: int | None = 0,
        num_samples: int = 1,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)
        self.sampler, self.seed, self.num_samples, self.progress = sampler, seed, max(int(num_samples), 1), progress
        self.last_std: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        gen = None if self.seed is None else torch.Generator(device=inputs.device).manual_seed(int(self.seed))
        net = network.module if hasattr(network, "module") and not hasattr(network, "sample") else network

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return net(x) if self.sampler is None else net.sample(x, self.sampler, generator=gen)

        samples = []
        for _ in range(self.num_samples if self.sampler is not None else 1):
            out = sliding_window_inference(
                inputs.float(), self.roi_size, self.sw_batch_size, predictor, overlap=self.overlap, mode="constant",
                progress=self.progress,
            )
            samples.append(out.as_tensor() if hasattr(out, "as_tensor") else out)
        stack = torch.stack(samples)
        self.last_std = stack.std(0, unbiased=False) if len(samples) > 1 else None
        return stack.mean(0).clamp(0.0, 1.0)

    def count_windows(self, lr_shape: Sequence[int], channels: int = 1) -> int:
        """Network calls per LR volume of spatial shape ``lr_shape``: the cost unit of validation and inference.

        Counted by running this inferer's own sliding window with a stand-in network that only counts its inputs
        (so padding of small volumes and the overlap rule are exactly the inferer's), not by a formula.
        """

        class _Counter(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.windows = 0

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                self.windows += x.shape[0]
                return torch.zeros(x.shape[0], 3, *(2 * s for s in x.shape[2:]))

        counter, sampler = _Counter(), self.sampler
        self.sampler = None  # the deterministic path: one call per window, whatever the sampler
        try:
            self(torch.zeros(1, channels, *lr_shape), counter)
        finally:
            self.sampler = sampler
        return counter.windows
