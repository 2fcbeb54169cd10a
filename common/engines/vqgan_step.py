"""Training step of the shared VQ-GAN (stage 1 of ALDM and of NODDI-SR), for :class:`~common.engines.StepTrainer`.

One iteration = one generator update, then one discriminator update (taming-transformers
``VQLossWithDiscriminator``; medicaldiffusion ``VQGAN.training_step`` with its two optimisers):

    L_G = w_rec * L1(x_hat, x) + w_vq * L_VQ + w_p * L_perc + f(step) * lambda * sum_i w_i * g(D_i(x_hat))
    L_D = f(step) * sum_i w_i * d(D_i(x), D_i(sg[x_hat]))

- ``f(step)`` is 0 before ``disc_start`` and 1 from then on (:func:`~common.losses.adversarial.adopt_weight`);
  ``step`` = number of completed iterations (``engine.state.iteration - 1``). Before the start the
  discriminators are not run at all (no compute, no update), and ``loss_adv_g``/``loss_d`` are 0.
- ``lambda`` is 1, or taming's adaptive weight on the decoder's last layer (``adaptive_weight=True``).
- ``g``/``d`` are hinge (default) or vanilla losses.
- The two updates are separated (noddi_sr spec pitfall 3): discriminator parameters are frozen
  during the generator backward, and the discriminator sees the detached reconstruction.
- Discriminator inputs: ``"volume"`` (the 3D image) or ``"slice"`` (one random slice per volume along
  the first spatial axis, the same positions for the real and the reconstructed volume; CLDM's 2D
  discriminator).
- ALDM stage 1 reconstructs a randomly chosen modality of the subject, the same image in and out:
  with ``image_keys=["t1", "t2", ...]`` each sample of the batch takes one of these keys, drawn
  with a generator seeded by ``seed`` and the step, so the choice is reproducible and a resumed run
  draws what an uninterrupted one would.

Output (floats, for StatsHandler/MLflow): ``loss`` (total generator loss), ``loss_rec`` (L1, unweighted),
``loss_vq`` (unweighted), ``loss_adv_g`` (the adversarial term as added to ``loss``), ``loss_d``,
``adv_weight`` (``f * lambda``), ``perplexity``, ``codebook_used``; with a perceptual module also
``loss_perceptual``; with several discriminators also ``loss_adv_g_<input>`` and ``loss_d_<input>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.engines.trainers import autocast as engine_autocast
from common.engines.trainers import no_param_grads, unwrap
from common.losses.adversarial import adaptive_gan_weight, adopt_weight, get_gan_losses
from common.networks.discriminators import disc_logits, random_slices

from .trainers import TrainingStep

__all__ = ["VQGANTrainingStep"]


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


class VQGANTrainingStep(TrainingStep):
    """Generator + discriminator update of a :class:`~common.networks.vqgan.VQGAN`.

    Args:
        network: the VQ-GAN.
        optimizer_g: optimiser of the autoencoder (encoder, convs, codebook, decoder).
        discriminators: ``None``, one discriminator or a list (e.g. ``[disc_3d, disc_2d]``).
        optimizer_d: one optimiser over all discriminator parameters (required with discriminators).
        disc_inputs: per discriminator ``"volume"`` or ``"slice"`` (default: all ``"volume"``).
        image_keys: batch key, or keys of which each sample uses one at random (ALDM modalities).
        rec_weight: weight of the L1 reconstruction (ALDM 1.0, CLDM 4.0).
        vq_weight: weight of the quantiser loss (1.0; the commitment ``beta`` is inside it).
        adv_weights: weight per discriminator (ALDM 1.0; CLDM 1.0 for each of the two); also used
            for the discriminator loss.
        disc_start: first step with adversarial terms (ALDM 10 000, CLDM 50 000).
        gan_loss: ``"hinge"`` or ``"vanilla"``.
        adaptive_weight: taming's adaptive weight (off by default: ALDM v1 never calls it).
        adaptive_disc_weight: its factor (0.8, taming ``disc_weight``).
        perceptual_loss: optional module ``(x_hat, x) -> scalar`` built from **local** weights by the
            caller; nothing is downloaded here. ``None`` (default) disables the term.
        perceptual_weight: its weight.
        seed: base seed of the per-step generator (modality choice, slice positions).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        discriminators: nn.Module | Sequence[nn.Module] | None = None,
        optimizer_d: torch.optim.Optimizer | None = None,
        disc_inputs: str | Sequence[str] | None = None,
        image_keys: str | Sequence[str] = "image",
        rec_weight: float = 1.0,
        vq_weight: float = 1.0,
        adv_weights: float | Sequence[float] = 1.0,
        disc_start: int = 0,
        gan_loss: str = "hinge",
        adaptive_weight: bool = False,
        adaptive_disc_weight: float = 0.8,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.network = network
        self.optimizer_g = optimizer_g
        self.discriminators: list[nn.Module] = _as_list(discriminators)
        self.optimizer_d = optimizer_d
        if self.discriminators and optimizer_d is None:
            raise ValueError("optimizer_d is required when discriminators are given")
        n = len(self.discriminators)
        self.disc_inputs = ["volume"] * n if disc_inputs is None else _as_list(disc_inputs)
        if len(self.disc_inputs) != n or any(k not in ("volume", "slice") for k in self.disc_inputs):
            raise ValueError(f"disc_inputs must give 'volume' or 'slice' for each of the {n} discriminators")
        weights = _as_list(adv_weights)
        self.adv_weights = [float(weights[0])] * n if len(weights) == 1 else [float(w) for w in weights]
        if len(self.adv_weights) != n:
            raise ValueError(f"adv_weights must have 1 or {n} entries, got {len(weights)}")
        self.image_keys = _as_list(image_keys)
        if not self.image_keys:
            raise ValueError("image_keys must name at least one batch key")
        self.rec_weight = float(rec_weight)
        self.vq_weight = float(vq_weight)
        self.disc_start = int(disc_start)
        self.d_loss_fn, self.g_loss_fn = get_gan_losses(gan_loss)
        self.adaptive_weight = bool(adaptive_weight)
        self.adaptive_disc_weight = float(adaptive_disc_weight)
        self.perceptual_loss = perceptual_loss
        if perceptual_loss is not None:  # a fixed pretrained feature network: never trained here
            perceptual_loss.eval().requires_grad_(False)
        self.perceptual_weight = float(perceptual_weight)
        self.seed = int(seed)

    # ------------------------------------------------------------------ inputs
    def generator(self, step: int) -> torch.Generator:
        """CPU generator of one step: depends only on ``seed`` and ``step``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))

    def select_image(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """The input images (B, C, *S): per sample one of ``image_keys`` (the only one if there is one)."""
        if len(self.image_keys) == 1:
            return torch.as_tensor(batch[self.image_keys[0]])
        stacks = [torch.as_tensor(batch[k]) for k in self.image_keys]
        choice = torch.randint(0, len(stacks), (stacks[0].shape[0],), generator=gen)
        return torch.stack([stacks[int(c)][b] for b, c in enumerate(choice)])

    def _disc_views(self, x: torch.Tensor, slice_index: torch.Tensor | None) -> list[torch.Tensor]:
        return [x if kind == "volume" else random_slices(x, index=slice_index)[0] for kind in self.disc_inputs]

    # ------------------------------------------------------------------ iteration
    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        step = int(engine.state.iteration) - 1
        device = engine.state.device
        amp = bool(getattr(engine, "amp", False))
        scaler = getattr(engine, "scaler", None) if amp else None

        gen = self.generator(step)

        x = self.select_image(batch, gen)
        x = x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x  # drop MetaTensor metadata
        x = x.to(device=device, non_blocking=bool(getattr(engine, "non_blocking", False)))
        factor = adopt_weight(step, self.disc_start)
        use_adv = factor > 0 and bool(self.discriminators)
        slice_index = (
            torch.randint(0, x.shape[2], (x.shape[0],), generator=gen) if "slice" in self.disc_inputs else None
        )

        # ---------------- generator update
        self.network.train()
        for d in self.discriminators:
            d.train()
        self.optimizer_g.zero_grad(set_to_none=True)
        out: dict[str, Any] = {}
        with no_param_grads(*self.discriminators), engine_autocast(engine):
            x_hat, vq_loss, stats = self.network(x)
            loss_rec = F.l1_loss(x_hat.float(), x.float())
            nll = self.rec_weight * loss_rec
            if self.perceptual_loss is not None:
                loss_perc = self.perceptual_loss(x_hat.float(), x.float()).mean()
                nll = nll + self.perceptual_weight * loss_perc
                out["loss_perceptual"] = loss_perc
            loss_g = nll + self.vq_weight * vq_loss
            adv_weight = torch.zeros((), device=x.device)
            loss_adv = torch.zeros((), device=x.device)
            if use_adv:
                terms = []
                views = self._disc_views(x_hat, slice_index)
                for disc, view, w, kind in zip(self.discriminators, views, self.adv_weights, self.disc_inputs):
                    # the unwrapped module: a frozen DDP discriminator would wait for gradients that never come
                    g = self.g_loss_fn(disc_logits(unwrap(disc)(view)).float())
                    terms.append(w * g)
                    if len(self.discriminators) > 1:
                        out[f"loss_adv_g_{kind}"] = g
                g_total = torch.stack(terms).sum()
                lam = (
                    adaptive_gan_weight(nll, g_total, unwrap(self.network).last_layer(), self.adaptive_disc_weight)
                    if self.adaptive_weight
                    else torch.ones((), device=x.device)
                )
                adv_weight = factor * lam
                loss_adv = adv_weight * g_total
                loss_g = loss_g + loss_adv
        if scaler is not None:
            scaler.scale(loss_g).backward()
            scaler.step(self.optimizer_g)
        else:
            loss_g.backward()
            self.optimizer_g.step()

        # ---------------- discriminator update (same delay)
        loss_d = torch.zeros((), device=x.device)
        if use_adv:
            self.optimizer_d.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            fake = x_hat.detach()
            with engine_autocast(engine):
                terms = []
                for disc, real_v, fake_v, w, kind in zip(
                    self.discriminators, self._disc_views(x, slice_index), self._disc_views(fake, slice_index),
                    self.adv_weights, self.disc_inputs,
                ):
                    d = self.d_loss_fn(disc_logits(disc(real_v)).float(), disc_logits(disc(fake_v)).float())
                    terms.append(w * d)
                    if len(self.discriminators) > 1:
                        out[f"loss_d_{kind}"] = d
                loss_d = factor * torch.stack(terms).sum()
            if scaler is not None:
                scaler.scale(loss_d).backward()
                scaler.step(self.optimizer_d)
            else:
                loss_d.backward()
                self.optimizer_d.step()  # type: ignore[union-attr]
        if scaler is not None:
            scaler.update()

        out.update(
            loss=loss_g,
            loss_rec=loss_rec,
            loss_vq=vq_loss,
            loss_adv_g=loss_adv,
            loss_d=loss_d,
            adv_weight=adv_weight,
            perplexity=stats["perplexity"],
            codebook_used=stats["codebook_used"],
        )
        return self.detach(out)
