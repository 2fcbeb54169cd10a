"""Training steps of ALDM stages 2 (MS-SPADE) and 3 (latent diffusion) for :class:`StepTrainer`.

Source: Kim & Park, WACV 2024 (arXiv 2311.00265); official code jongdory/ALDM v1
(``VQ-GAN/configs/brats_vqgan_stage2.yaml``, ``LDM/ldm/models/diffusion/ddpm.py``,
``LDM/configs/latent-diffusion/brats-ldm-vq-4.yaml``). Stage 1 (the VQ-GAN autoencoder) is
``common.engines.vqgan_step.VQGANTrainingStep``.

Both steps read one subject per batch with every modality loaded under its own key
(``batch["t1"]``, ``batch["t2"]``, ... each ``(N, 1, H, W, D)``) and work on the quantised
latents ``E_q(x)`` of the frozen autoencoder (encoder + ``quant_conv`` + quantiser).

Stage 2, :class:`SPADETrainingStep` (only the MS-SPADE generator and the latent discriminator
learn)::

    z_s = E_q(x_src), z_t = E_q(x_tgt), z^_t = SPADE_tgt(z_s)
    L_G = w_l1 |z^_t - z_t|_1 + w_adv (-mean D_lat(z^_t)) + w_cyc L_cyc
    L_cyc = |SPADE_src(z^_t) - z_s|_1              (cycle_space="latent")
          = |D(SPADE_src(z^_t)) - x_src|_1          (cycle_space="image", through the frozen decoder)
    L_D = 0.5 (mean relu(1 - D_lat(z_t)) + mean relu(1 + D_lat(z^_t)))

The cycle term is described in the paper but present in no official commit (ours: weight 1.0).

Stage 3, :class:`LatentDiffusionTrainingStep` (only the UNet learns; its EMA follows)::

    z_src = s E_q(x_src), c = s SPADE_tgt(E_q(x_src)), z_0 = s E_q(x_tgt)   (s = scale factor)
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
    L = MSE(UNet([z_src, c, z_t], t, target condition), eps)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engines.trainers import TrainingStep, autocast, engine_device, freeze, no_param_grads, optimizer_step, unwrap
from common.losses.adversarial import adopt_weight, hinge_d_loss, hinge_g_loss
from common.networks.aldm_ldm import target_condition
from common.networks.discriminators import disc_logits

__all__ = [
    "encode_quantized",
    "decode_latent",
    "sample_pair",
    "SPADETrainingStep",
    "LatentDiffusionTrainingStep",
    "freeze",
    "unwrap",
]


def encode_quantized(autoencoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``E_q(x)``: the quantised latent of the shared VQ-GAN (first item if it returns a tuple)."""
    out = autoencoder.encode_quantized(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def decode_latent(autoencoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``D(post_quant_conv(z))`` without re-quantising (as the official sampler decodes)."""
    out = autoencoder.decode(z)
    return out[0] if isinstance(out, (tuple, list)) else out


def sample_pair(modalities: Sequence[str], allow_identity: bool, generator: torch.Generator | None = None) -> tuple[str, str]:
    """A (source, target) pair: uniform over ordered pairs with ``s != t``, or independent draws.

    Uses torch's RNG (seeded by ``set_determinism`` / ``EpochSeedHandler``), so a resumed run
    draws the same pairs as an uninterrupted one.
    """
    m = len(modalities)
    if allow_identity:
        s, t = torch.randint(m, (2,), generator=generator).tolist()
        return modalities[s], modalities[t]
    if m < 2:
        raise ValueError("need at least two modalities for pairs with source != target")
    k = int(torch.randint(m * (m - 1), (1,), generator=generator))
    s, r = divmod(k, m - 1)
    return modalities[s], modalities[r if r < s else r + 1]


class SPADETrainingStep(TrainingStep):
    """Stage 2: train the MS-SPADE generator on frozen quantised latents.

    Args:
        autoencoder: stage-1 VQ-GAN (``encode_quantized``, ``decode``); frozen here.
        spade: :class:`common.networks.spade.MSSPADEGenerator`.
        discriminator: latent PatchGAN (``in_channels = embed_dim``).
        optimizer_g: optimiser of ``spade.parameters()`` only.
        optimizer_d: optimiser of the latent discriminator.
        modalities: image keys of the batch, also the SPADE branch names.
        l1_weight, adv_weight, cycle_weight: loss weights (1.0, 1.0, 1.0); ``cycle_weight = 0``
            removes the cycle term (and its log key).
        cycle_space: ``"latent"`` (default) or ``"image"``.
        allow_identity_pairs: draw source and target independently (v1), identity pairs allowed.
        disc_start: iteration from which the adversarial terms are on (v1: 0).
        frozen: further modules to keep frozen (e.g. the stage-1 image discriminator, if loaded).

    Returns per iteration ``{"loss", "l1_latent", "adv_latent", ["cycle"], "loss_d"}``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        spade: nn.Module,
        discriminator: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        modalities: Sequence[str],
        l1_weight: float = 1.0,
        adv_weight: float = 1.0,
        cycle_weight: float = 1.0,
        cycle_space: str = "latent",
        allow_identity_pairs: bool = True,
        disc_start: int = 0,
        frozen: Sequence[nn.Module] | None = None,
    ) -> None:
        if cycle_space not in ("latent", "image"):
            raise ValueError(f"cycle_space must be 'latent' or 'image', got {cycle_space!r}")
        self.autoencoder = autoencoder
        self.spade = spade
        self.discriminator = discriminator
        self.optimizer_g = optimizer_g
        self.optimizer_d = optimizer_d
        self.modalities = list(modalities)
        self.l1_weight = float(l1_weight)
        self.adv_weight = float(adv_weight)
        self.cycle_weight = float(cycle_weight)
        self.cycle_space = cycle_space
        self.allow_identity_pairs = bool(allow_identity_pairs)
        self.disc_start = int(disc_start)
        self.frozen = [autoencoder, *(frozen or [])]
        freeze(*self.frozen)

    def __call__(self, engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        device = engine_device(engine)
        freeze(*self.frozen)  # a handler may have switched modes; keep the autoencoder in eval
        self.spade.train()
        src, tgt = sample_pair(self.modalities, self.allow_identity_pairs)
        x_src = batch[src].to(device)
        # iteration is 1-based inside an Ignite iteration; adopt_weight counts completed updates
        adv_on = adopt_weight(engine.state.iteration - 1, self.disc_start)

        with autocast(engine):
            with torch.no_grad():
                z_s = encode_quantized(self.autoencoder, x_src)
                z_t = encode_quantized(self.autoencoder, batch[tgt].to(device))
            z_hat = self.spade(z_s, tgt)
            losses: dict[str, torch.Tensor] = {"l1_latent": F.l1_loss(z_hat, z_t)}
            # the generator term must not touch D's gradients (nor, under DDP, its gradient hooks)
            disc = unwrap(self.discriminator)
            with no_param_grads(disc):
                losses["adv_latent"] = hinge_g_loss(disc_logits(disc(z_hat.float())))
            total = self.l1_weight * losses["l1_latent"] + self.adv_weight * adv_on * losses["adv_latent"]
            if self.cycle_weight > 0:
                z_cyc = self.spade(z_hat, src)
                if self.cycle_space == "latent":
                    losses["cycle"] = F.l1_loss(z_cyc, z_s)
                else:
                    losses["cycle"] = F.l1_loss(decode_latent(self.autoencoder, z_cyc), x_src)
                total = total + self.cycle_weight * losses["cycle"]
        optimizer_step(engine, total, self.optimizer_g)

        loss_d = torch.zeros((), device=device)
        if adv_on > 0:  # before disc_start D is not run at all (no forward without backward under DDP)
            self.discriminator.train()
            with autocast(engine):
                # one forward for real and fake (GroupNorm is per sample, so this equals two calls)
                logits = disc_logits(self.discriminator(torch.cat([z_t, z_hat.detach()], dim=0).float()))
                d_real, d_fake = logits.split(z_t.shape[0], dim=0)
                loss_d = hinge_d_loss(d_real, d_fake)
            optimizer_step(engine, self.adv_weight * loss_d, self.optimizer_d)
        return self.detach({"loss": total, **losses, "loss_d": loss_d})


class LatentDiffusionTrainingStep(TrainingStep):
    """Stage 3: epsilon-prediction training of the ALDM UNet on frozen latents, with EMA.

    Args:
        autoencoder: frozen stage-1 VQ-GAN.
        spade: frozen stage-2 MS-SPADE generator.
        network: the diffusion UNet (:func:`common.networks.aldm_ldm.aldm_diffusion_unet`).
        optimizer: optimiser of ``network.parameters()`` (AdamW, lr 2e-6 in the paper).
        scheduler: MONAI ``DDPMScheduler`` / ``DDIMScheduler`` with the training schedule.
        modalities: image keys / target names, in the order of the one-hot condition.
        ema: :class:`common.engines.ema.EMA` of ``network`` (updated after every step) or None.
        conditioning: ``"cross_attention"`` (one-hot context) or ``"class_embed"``.
        scale_factor: latent scale (1.0 in v1) or ``"auto"`` = 1 / std of the first batch's
            quantised target latent; saved by :meth:`state_dict`, so put this step in the
            checkpoint to resume with the same scale.

    Returns per iteration ``{"loss", "mse", "ema_decay"}``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        spade: nn.Module,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        modalities: Sequence[str],
        ema: nn.Module | None = None,
        conditioning: str = "cross_attention",
        scale_factor: float | str = 1.0,
    ) -> None:
        self.autoencoder = autoencoder
        self.spade = spade
        self.network = network
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.modalities = list(modalities)
        self.ema = ema
        self.conditioning = conditioning
        if isinstance(scale_factor, str) and scale_factor != "auto":
            raise ValueError(f"scale_factor must be a number or 'auto', got {scale_factor!r}")
        self.scale_factor: float | None = None if scale_factor == "auto" else float(scale_factor)
        freeze(autoencoder, spade)

    def state_dict(self) -> dict[str, Any]:
        return {"scale_factor": torch.tensor(float("nan") if self.scale_factor is None else self.scale_factor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = float(state["scale_factor"])
        self.scale_factor = None if value != value else value  # NaN = not yet estimated

    @torch.no_grad()
    def conditioning_latents(self, x_src: torch.Tensor, target: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_src, SPADE_tgt(z_src))``, unscaled, from the frozen stages 1 and 2."""
        z_src = encode_quantized(self.autoencoder, x_src)
        return z_src, self.spade(z_src, target)

    def __call__(self, engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        device = engine_device(engine)
        freeze(self.autoencoder, self.spade)
        self.network.train()
        src, tgt = sample_pair(self.modalities, allow_identity=False)
        with autocast(engine):
            z_src, c = self.conditioning_latents(batch[src].to(device), tgt)
            with torch.no_grad():
                z0 = encode_quantized(self.autoencoder, batch[tgt].to(device))
            if self.scale_factor is None:
                self.scale_factor = float(1.0 / z0.float().flatten().std().clamp_min(1e-8))
            s = self.scale_factor
            z_src, c, z0 = s * z_src, s * c, s * z0
            n = z0.shape[0]
            t = torch.randint(0, self.scheduler.num_train_timesteps, (n,), device=device, dtype=torch.long)
            noise = torch.randn_like(z0)
            z_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
            cond = target_condition(tgt, self.modalities, self.conditioning, batch_size=n, device=device)
            eps_hat = self.network(torch.cat([z_src, c, z_t], dim=1), t, **cond)
            mse = F.mse_loss(eps_hat.float(), noise.float())
        optimizer_step(engine, mse, self.optimizer)
        out: dict[str, Any] = {"loss": mse, "mse": mse}
        if self.ema is not None:
            out["ema_decay"] = self.ema.update(self.network)
        return self.detach(out)
