"""Training steps of the three MAISI stages for :class:`common.engines.StepTrainer`.

Sources: MAISI (Guo et al., arXiv 2409.11169) and the official training scripts of the MONAI tutorials /
NV-Generate-CTMR (``maisi_train_vae_tutorial``, ``diff_model_train.py``, ``train_controlnet.py``; spec
``maisi_ct`` section 3).

* :class:`MaisiVAEStep` (VAE-GAN)::

      x^, mu, sigma = VAE(x)
      L_G = |x^ - x|_1 + w_kl KL + w_perc L_perc + w_adv L_adv,G
      KL  = 0.5 sum_{C,X,Y,Z}(mu^2 + sigma^2 - log sigma^2 - 1), averaged over the batch
      L_D = 0.5 (L_adv(D(x^), fake) + L_adv(D(x), real))        (least squares, PatchGAN)

* :class:`MaisiDiffusionStep` (UNet on precomputed latents)::

      x0 = s * latent,  s = 1 / std(first batch)  (kept in a LatentScale module, saved in the checkpoint)
      rflow: t = scheduler.sample_timesteps(x0), target = x0 - eps;  DDPM: t ~ U{0..T-1}, target = eps
      L = |UNet(add_noise(x0, eps, t), t, spacing x 100, [regions x 100 | modality]) - target|_1

* :class:`MaisiControlNetStep` (UNet frozen)::

      residuals = ControlNet(x_t, t, binarize_labels(label), modality)
      L = mean(|UNet(x_t, t, spacing x 100, modality, residuals) - target| * w),
      w = weighted_loss (100) on latent voxels whose (nearest-downsampled) label is in weighted_loss_label, else 1

  plus the MAISI-v2 region-specific contrastive term (arXiv 2508.05772; off when its weight is 0)::

      out_free = UNet(..., ControlNet(x_t, t, binarize_labels(remove_roi(label)), modality))   (same x_t, t)
      ROI  = voxels whose label remove_roi changes (image resolution), bg = 1 - dilate(ROI, 3)
      fg   = max(-mean_{ROI, channels} |out - out_free|, -delta)              (delta = 2)
      bg   = mean_{bg, channels} |out_free - target|
      L   += w_c (fg + bg)                                                     (w_c = 0.01)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from monai.losses.adversarial_loss import PatchAdversarialLoss
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.transforms.utils_morphological_ops import dilate

from common.engines.trainers import TrainingStep, autocast, engine_device, freeze, optimizer_step, unwrap
from common.networks.discriminators import disc_logits
from common.transforms.maisi import binarize_labels

__all__ = [
    "LatentScale",
    "kl_loss",
    "label_weight_map",
    "weighted_l1",
    "DEFAULT_ROI_REPLACEMENT",
    "remove_roi",
    "region_contrastive_masks",
    "region_contrastive_loss",
    "freeze",
    "MaisiVAEStep",
    "MaisiDiffusionStep",
    "MaisiControlNetStep",
]


class LatentScale(nn.Module):
    """Holds the latent scale factor ``s`` as a buffer so it is saved with the checkpoint (0 = not set yet)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value)))

    @property
    def initialised(self) -> bool:
        return bool(self.value > 0)

    @torch.no_grad()
    def init_from(self, latent: torch.Tensor) -> None:
        """``s = 1 / std(latent)``; the std is averaged over ranks so every rank uses the same ``s``."""
        std = latent.detach().float().std()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(std, op=dist.ReduceOp.SUM)
            std = std / dist.get_world_size()
        self.value.copy_((1.0 / std).to(self.value))


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence to N(0, I), summed over channels and voxels, averaged over the batch."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=dims)
    return kl.mean()


def label_weight_map(label: torch.Tensor, latent_shape: Sequence[int], labels: Sequence[int], weight: float) -> torch.Tensor:
    """Per-voxel loss weight at latent size: ``weight`` where the nearest-downsampled label is in ``labels``, else 1."""
    small = F.interpolate(label.float(), size=tuple(latent_shape), mode="nearest")
    hit = torch.isin(small.long(), torch.as_tensor(list(labels), device=label.device, dtype=torch.long))
    return torch.where(hit, torch.full_like(small, float(weight)), torch.ones_like(small))


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean(|pred - target| * w)``; ``w`` (N, 1, ...) applies to every channel."""
    return (torch.abs(pred.float() - target.float()) * weights).mean()


#: ROI removal of the region-specific contrastive loss, after ``remove_tumors`` of NV-Generate-CTMR
#: (``scripts/augmentation.py``, called by ``remove_roi`` in ``scripts/train_controlnet.py``): every ROI label id is
#: replaced by its host organ, not by background: hepatic tumor 26 -> liver 1, pancreatic tumor 24 -> pancreas 4,
#: colon cancer primaries 27 -> colon 62; lung tumor 23 -> the lung lobe (28-32) that is most frequent in the
#: one-voxel ring around the tumour (a sequence = such a majority vote). Bone lesion 128 is left unchanged there
#: (it is replaced only when pseudo labels are given), so it is no ROI by default.
DEFAULT_ROI_REPLACEMENT: dict[int, int | tuple[int, ...]] = {26: 1, 24: 4, 27: 62, 23: (28, 29, 30, 31, 32)}


def _majority_around(label: torch.Tensor, roi: torch.Tensor, candidates: Sequence[int]) -> int:
    """Most frequent of ``candidates`` in the 3x3x3 ring around ``roi`` (one sample, (1, X, Y, Z)); ties -> the
    smallest id. Empty ring: the most frequent candidate in the whole label, else the first candidate."""
    cand = torch.as_tensor(list(candidates), device=label.device, dtype=torch.long)
    ring = F.max_pool3d(roi[None].float(), kernel_size=3, stride=1, padding=1)[0].bool() & ~roi
    votes = label[ring & torch.isin(label, cand)]
    if votes.numel() == 0:
        votes = label[torch.isin(label, cand)]
    if votes.numel() == 0:
        return int(cand[0])
    counts = torch.stack([(votes == c).sum() for c in cand])
    return int(cand[int(torch.argmax(counts))])  # argmax returns the first maximum: smallest id among ties (sorted)


def remove_roi(label: torch.Tensor, replacement: Mapping[Any, Any] | None = None) -> torch.Tensor:
    """The label map with every ROI label replaced, per sample (the "ROI-free" condition of the contrastive loss).

    Args:
        label: integer label map (N, 1, X, Y, Z).
        replacement: ``{roi_id: new_id}`` or ``{roi_id: [candidate ids]}`` (majority vote of the candidates in the
            one-voxel ring around that ROI); keys may be strings (JSON). Default :data:`DEFAULT_ROI_REPLACEMENT`.
            Direct replacements are applied first, majority votes on their result.

    Returns:
        a new long tensor of the same shape; voxels whose value changed form the ROI.
    """
    table = DEFAULT_ROI_REPLACEMENT if replacement is None else replacement
    direct = {int(k): int(v) for k, v in table.items() if not isinstance(v, (list, tuple))}
    voted = {int(k): [int(i) for i in v] for k, v in table.items() if isinstance(v, (list, tuple))}
    lab = torch.as_tensor(label).long()
    out = lab.clone()
    for old, new in direct.items():
        out[lab == old] = new
    for n in range(out.shape[0]):
        for old, candidates in voted.items():
            roi = out[n] == old
            if bool(roi.any()):
                out[n][roi] = _majority_around(out[n], roi, sorted(candidates))
    return out


def region_contrastive_masks(
    label: torch.Tensor, label_roi_free: torch.Tensor, latent_shape: Sequence[int], dilation: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROI and background masks of the contrastive loss at latent size, (N, 1, x, y, z) float in {0, 1}.

    As in NV-Generate-CTMR ``train_controlnet.py``: ROI = voxels where ``remove_roi`` changed the label, background
    = 1 - ``monai.transforms.utils_morphological_ops.dilate(ROI, filter_size=3)`` (zero padding); both computed at
    the label's (image) resolution, then nearest-downsampled to the latent size.
    """
    roi = (torch.as_tensor(label).long() != torch.as_tensor(label_roi_free).long()).float()
    bg = 1.0 - (dilate(roi, filter_size=int(dilation)) > 0).float() if dilation > 1 else 1.0 - roi
    size = tuple(int(s) for s in latent_shape)
    return F.interpolate(roi, size=size, mode="nearest"), F.interpolate(bg, size=size, mode="nearest")


def region_contrastive_loss(
    pred: torch.Tensor,
    pred_roi_free: torch.Tensor,
    target: torch.Tensor,
    roi: torch.Tensor,
    background: torch.Tensor,
    margin: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAISI-v2 region-specific contrastive terms ``(fg, bg)`` (``compute_region_contrasive_loss`` of NV-Generate-CTMR).

    ``fg = max(-mean_{ROI} |pred - pred_roi_free|, -margin)``: rewards outputs that change inside the ROI when the
    ROI label is removed, bounded by ``margin`` (delta = 2). ``bg = mean_{background} |pred_roi_free - target|``:
    the ROI-free output must still fit the target outside the dilated ROI. Means run over masked voxels and all
    channels; an empty mask gives 0 (the official code divides by ``count + 1e-5``).

    Args:
        pred, pred_roi_free, target: (N, C, x, y, z).
        roi, background: (N, 1, x, y, z) masks at latent size (:func:`region_contrastive_masks`).
    """
    c = pred.shape[1]
    roi, background = roi.to(pred.device).float(), background.to(pred.device).float()
    diff = torch.abs(pred.float() - pred_roi_free.float())
    fg = -(diff * roi).sum() / torch.clamp(roi.sum() * c, min=1.0)
    fg = torch.clamp(fg, min=-float(margin)) + 0.0  # + 0.0: an empty ROI logs 0, not -0
    bg = (torch.abs(pred_roi_free.float() - target.float()) * background).sum() / torch.clamp(background.sum() * c, min=1.0)
    return fg, bg


class MaisiVAEStep(TrainingStep):
    """VAE-GAN step of the CT autoencoder.

    Args:
        autoencoder: ``AutoencoderKlMaisi`` (trained with ``num_splits=1``).
        discriminator: ``PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1,
            out_channels=1, norm="INSTANCE")``.
        optimizer_g, optimizer_d: Adam (lr 1e-4 in the official recipe).
        kl_weight: 1e-7; perceptual_weight: 0.3 officially, 0 here unless a ``perceptual_loss`` built from
            local weights is given; adv_weight: 0.1 (0 leaves the discriminator out of the step: neither run
            nor trained; ``loss_adv_g`` and ``loss_d`` are then 0).
        perceptual_loss: optional callable ``(x_hat, x) -> loss`` (MONAI ``PerceptualLoss`` with local weights).
        image_key: batch key of the image (N, 1, X, Y, Z) scaled to [0, 1].

    Returns per iteration ``{"loss", "loss_l1", "loss_kl", "loss_perc", "loss_adv_g", "loss_d", "latent_inv_std"}``;
    ``latent_inv_std`` = 1 / std(mu) should stay near 1 (the KL weight was tuned for it).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        discriminator: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        kl_weight: float = 1e-7,
        perceptual_weight: float = 0.0,
        adv_weight: float = 0.1,
        perceptual_loss: Any = None,
        image_key: str = "image",
    ) -> None:
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual_loss built from local weights")
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.optimizer_g = optimizer_g
        self.optimizer_d = optimizer_d
        self.kl_weight = float(kl_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.adv_weight = float(adv_weight)
        self.perceptual_loss = perceptual_loss
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.image_key = image_key

    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        device = engine_device(engine)
        x = batch[self.image_key].to(device).float()
        self.autoencoder.train()
        self.discriminator.train()
        with autocast(engine):
            recon, z_mu, z_sigma = self.autoencoder(x)
            loss_l1 = F.l1_loss(recon.float(), x)
            loss_kl = kl_loss(z_mu.float(), z_sigma.float())
            loss_perc = self.perceptual_loss(recon.float(), x) if self.perceptual_weight > 0 else torch.zeros((), device=device)
            if self.adv_weight > 0:
                self.discriminator.requires_grad_(False)  # the generator update must not train the discriminator
                loss_adv_g = self.adv_loss(disc_logits(self.discriminator(recon.float())), target_is_real=True, for_discriminator=False)
                self.discriminator.requires_grad_(True)
            else:  # no adversarial term: the discriminator is neither run nor trained
                loss_adv_g = torch.zeros((), device=device)
            loss_g = loss_l1 + self.kl_weight * loss_kl + self.perceptual_weight * loss_perc + self.adv_weight * loss_adv_g
        optimizer_step(engine, loss_g, self.optimizer_g)

        loss_d = torch.zeros((), device=device)
        if self.adv_weight > 0:
            with autocast(engine):
                fake = self.adv_loss(disc_logits(self.discriminator(recon.detach().float())), target_is_real=False, for_discriminator=True)
                real = self.adv_loss(disc_logits(self.discriminator(x)), target_is_real=True, for_discriminator=True)
                loss_d = 0.5 * (fake + real)
            optimizer_step(engine, loss_d, self.optimizer_d)
        return self.detach(
            {
                "loss": loss_g,
                "loss_l1": loss_l1,
                "loss_kl": loss_kl,
                "loss_perc": loss_perc,
                "loss_adv_g": loss_adv_g,
                "loss_d": loss_d,
                "latent_inv_std": 1.0 / z_mu.detach().float().std(),
            }
        )


class _LatentDiffusionBase(TrainingStep):
    """Shared noise / timestep / condition logic of the diffusion and ControlNet steps."""

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: RFlowScheduler | DDPMScheduler,
        scale_factor: LatentScale | float,
        image_key: str = "image",
        spacing_key: str = "spacing",
        modality_key: str = "modality",
        top_region_key: str = "top_region_index",
        bottom_region_key: str = "bottom_region_index",
        default_modality: int = 1,
    ) -> None:
        self.unet = unet
        self.scheduler = noise_scheduler
        self.scale_factor = scale_factor if isinstance(scale_factor, LatentScale) else LatentScale(float(scale_factor))
        self.image_key = image_key
        self.spacing_key = spacing_key
        self.modality_key = modality_key
        self.top_region_key = top_region_key
        self.bottom_region_key = bottom_region_key
        self.default_modality = int(default_modality)

    @property
    def is_rflow(self) -> bool:
        return isinstance(self.scheduler, RFlowScheduler)

    def noisy_input(self, batch: Any, device: torch.device):
        latent = batch[self.image_key].to(device).float()
        if not self.scale_factor.initialised:
            self.scale_factor.init_from(latent)
        x0 = latent * self.scale_factor.value.to(device)
        noise = torch.randn_like(x0)
        if self.is_rflow:
            t = self.scheduler.sample_timesteps(x0)
            target = x0 - noise  # velocity of the straight path from noise to data
        else:
            t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=device).long()
            target = noise
        return self.scheduler.add_noise(x0, noise, t), t, target

    def conditions(self, batch: Any, device: torch.device, n: int) -> dict[str, torch.Tensor]:
        kw: dict[str, torch.Tensor] = {}
        if getattr(unwrap(self.unet), "include_spacing_input", False):
            kw["spacing_tensor"] = torch.as_tensor(batch[self.spacing_key]).to(device).float().reshape(n, 3) * 100.0
        if getattr(unwrap(self.unet), "include_top_region_index_input", False):
            kw["top_region_index_tensor"] = torch.as_tensor(batch[self.top_region_key]).to(device).float().reshape(n, 4) * 100.0
        if getattr(unwrap(self.unet), "include_bottom_region_index_input", False):
            kw["bottom_region_index_tensor"] = torch.as_tensor(batch[self.bottom_region_key]).to(device).float().reshape(n, 4) * 100.0
        return kw

    def class_labels(self, batch: Any, device: torch.device, n: int) -> torch.Tensor | None:
        if getattr(unwrap(self.unet), "num_class_embeds", None) is None:
            return None
        if isinstance(batch, dict) and self.modality_key in batch:
            return torch.as_tensor(batch[self.modality_key]).to(device).long().reshape(n)
        return torch.full((n,), self.default_modality, dtype=torch.long, device=device)


class MaisiDiffusionStep(_LatentDiffusionBase):
    """Diffusion-UNet step on precomputed latents (rectified flow by default, DDPM with a ``DDPMScheduler``).

    Args:
        unet: ``DiffusionModelUNetMaisi``.
        optimizer: Adam (lr 1e-4 tutorial; 1e-5 NV-Generate rflow-ct).
        noise_scheduler: ``RFlowScheduler`` or ``DDPMScheduler`` with the official arguments.
        scale_factor: a :class:`LatentScale` (set from the first batch when 0) or a fixed value.
        modality_dropout: rflow modality augmentation of NV-Generate: with this probability a CT sub-type
            (2..7) becomes CT (1) and an MR sub-type (>= 9) becomes MR (8); with the same probability the
            label becomes 0 (unconditional, enables classifier-free guidance). 0 disables it.

    Batch: ``image`` latent (N, 4, x, y, z), ``spacing`` (N, 3) mm, rflow ``modality`` (N,) (default 1 = CT),
    DDPM ``top_region_index`` / ``bottom_region_index`` (N, 4) one-hot. Returns ``{"loss", "loss_l1", "scale_factor"}``.
    """

    def __init__(
        self,
        unet: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_scheduler: RFlowScheduler | DDPMScheduler,
        scale_factor: LatentScale | float,
        modality_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(unet, noise_scheduler, scale_factor, **kwargs)
        self.optimizer = optimizer
        self.modality_dropout = float(modality_dropout)

    def augment_modality(self, labels: torch.Tensor) -> torch.Tensor:
        if self.modality_dropout <= 0:
            return labels
        labels = labels.clone()
        coarse = torch.rand(labels.shape, device=labels.device) < self.modality_dropout
        labels[coarse & (labels >= 2) & (labels <= 7)] = 1
        labels[coarse & (labels >= 9)] = 8
        drop = torch.rand(labels.shape, device=labels.device) < self.modality_dropout
        labels[drop] = 0
        return labels

    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        device = engine_device(engine)
        self.unet.train()
        x_t, t, target = self.noisy_input(batch, device)
        n = x_t.shape[0]
        labels = self.class_labels(batch, device, n)
        kw = self.conditions(batch, device, n)
        if labels is not None:
            kw["class_labels"] = self.augment_modality(labels)
        with autocast(engine):
            pred = self.unet(x=x_t, timesteps=t, **kw)
            loss = F.l1_loss(pred.float(), target.float())
        optimizer_step(engine, loss, self.optimizer)
        return self.detach({"loss": loss, "loss_l1": loss, "scale_factor": self.scale_factor.value.clone()})


class MaisiControlNetStep(_LatentDiffusionBase):
    """ControlNet step with the diffusion UNet frozen and the label-weighted L1 loss.

    Args:
        controlnet: ``ControlNetMaisi`` (initialised from the UNet weights, see
            :func:`common.networks.maisi.init_controlnet_from_unet`).
        unet: trained diffusion UNet; frozen here (eval, no gradients; gradients still flow *through* it).
        optimizer: AdamW over the ControlNet parameters only.
        noise_scheduler: as for the diffusion step.
        scale_factor: the diffusion checkpoint's scale factor (a float or a :class:`LatentScale` filled before
            training starts).
        weighted_loss: weight on the voxels of ``weighted_loss_label`` (100 officially).
        weighted_loss_label: label ids to emphasise (template [129]; rflow-ct [23]).
        label_key: batch key of the label map at image resolution (N, 1, 4x, 4y, 4z).
        contrastive_loss_weight: weight ``w_c`` of the MAISI-v2 region-specific contrastive term (0 = off, the loss
            is then exactly the weighted L1). NV-Generate-CTMR's rflow-ct ControlNet config turns it on with
            ``region_contrasive_loss_weight`` 0.01 and ``region_contrasive_loss_delta`` 2; ddpm-ct / rflow-mr leave it off.
        contrastive_margin: ``delta``, the bound of the foreground term (``fg >= -delta``).
        contrastive_dilation: odd filter size of the ROI dilation that defines the background (3 officially, at
            the label's image resolution; 1 = no dilation).
        contrastive_roi_replacement: how :func:`remove_roi` builds the ROI-free label (default: tumours -> their
            host organ, :data:`DEFAULT_ROI_REPLACEMENT`).

    The second (ROI-free) forward runs only when a sample of the batch has an ROI: without one, ``out_free``
    would equal ``out`` exactly, so ``fg`` = 0 and ``bg`` = the unweighted L1 over all voxels, taken from the first
    forward (same value and gradient as the official double forward, half the cost).

    Returns ``{"loss", "loss_weighted_l1"}``, plus ``"loss_contrastive_fg"``, ``"loss_contrastive_bg"`` (unweighted
    terms) and ``"contrastive_roi_voxels"`` (ROI size at latent resolution) when the contrastive term is on.
    """

    def __init__(
        self,
        controlnet: nn.Module,
        unet: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise_scheduler: RFlowScheduler | DDPMScheduler,
        scale_factor: LatentScale | float,
        weighted_loss: float = 100.0,
        weighted_loss_label: Sequence[int] = (129,),
        label_key: str = "label",
        contrastive_loss_weight: float = 0.0,
        contrastive_margin: float = 2.0,
        contrastive_dilation: int = 3,
        contrastive_roi_replacement: Mapping[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(unet, noise_scheduler, scale_factor, **kwargs)
        self.controlnet = controlnet
        self.optimizer = optimizer
        self.weighted_loss = float(weighted_loss)
        self.weighted_loss_label = [int(i) for i in weighted_loss_label]
        self.label_key = label_key
        if contrastive_loss_weight < 0 or contrastive_margin < 0:
            raise ValueError("contrastive_loss_weight and contrastive_margin must be >= 0")
        if int(contrastive_dilation) < 1 or int(contrastive_dilation) % 2 == 0:
            raise ValueError(f"contrastive_dilation must be an odd filter size >= 1, got {contrastive_dilation}")
        self.contrastive_loss_weight = float(contrastive_loss_weight)
        self.contrastive_margin = float(contrastive_margin)
        self.contrastive_dilation = int(contrastive_dilation)
        self.contrastive_roi_replacement = contrastive_roi_replacement
        freeze(unet)

    def _predict(self, x_t, t, cond, cls, batch, device, n):
        down, mid = self.controlnet(x=x_t, timesteps=t, controlnet_cond=cond, **cls)
        return self.unet(
            x=x_t, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
            **cls, **self.conditions(batch, device, n),
        )

    def __call__(self, engine: Any, batch: Any) -> dict[str, Any]:
        device = engine_device(engine)
        if not self.scale_factor.initialised:
            # never estimate it here: the ControlNet must see latents scaled exactly as the UNet was trained
            raise ValueError("the ControlNet stage needs the scale factor of the trained diffusion UNet (> 0)")
        self.controlnet.train()
        self.unet.eval()
        x_t, t, target = self.noisy_input(batch, device)
        n = x_t.shape[0]
        label = torch.as_tensor(batch[self.label_key]).to(device)
        cond = binarize_labels(label)
        labels = self.class_labels(batch, device, n)
        cls = {"class_labels": labels} if labels is not None else {}
        weights = label_weight_map(label, x_t.shape[2:], self.weighted_loss_label, self.weighted_loss)
        out: dict[str, Any] = {}
        with autocast(engine):
            pred = self._predict(x_t, t, cond, cls, batch, device, n)
            loss_l1 = weighted_l1(pred, target, weights)
            loss = loss_l1
            if self.contrastive_loss_weight > 0:
                label_free = remove_roi(label, self.contrastive_roi_replacement)
                roi, bg = region_contrastive_masks(label, label_free, x_t.shape[2:], self.contrastive_dilation)
                has_roi = bool(torch.any(label_free != label.long()))
                pred_free = self._predict(x_t, t, binarize_labels(label_free), cls, batch, device, n) if has_roi else pred
                fg_term, bg_term = region_contrastive_loss(pred, pred_free, target, roi, bg, self.contrastive_margin)
                loss = loss_l1 + self.contrastive_loss_weight * (fg_term + bg_term)
                out = {"loss_contrastive_fg": fg_term, "loss_contrastive_bg": bg_term, "contrastive_roi_voxels": roi.sum()}
        optimizer_step(engine, loss, self.optimizer)
        return self.detach({"loss": loss, "loss_weighted_l1": loss_l1, **out})
