"""Adversarial losses and weights of the VQ-GAN stages (taming-transformers design).

Sources: P. Esser, R. Rombach, B. Ommer, "Taming Transformers for High-Resolution Image
Synthesis", CVPR 2021, eq. 7 (adaptive weight) and the official ``CompVis/taming-transformers``
``taming/modules/losses/vqperceptual.py`` (hinge/vanilla losses, ``adopt_weight``,
``calculate_adaptive_weight``). Logits are discriminator outputs of any shape; every loss is a mean.

- hinge: ``L_D = 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``, ``L_G = -mean D(x_hat)``;
- vanilla (non-saturating BCE): ``L_D = 0.5 (mean softplus(-D(x)) + mean softplus(D(x_hat)))``,
  ``L_G = mean softplus(-D(x_hat))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "hinge_d_loss",
    "hinge_g_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
    "get_gan_losses",
    "adopt_weight",
    "adaptive_gan_weight",
]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean D(x_hat)``."""
    return -logits_fake.mean()


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator BCE loss on logits, ``0.5 (mean softplus(-D(x)) + mean softplus(D(x_hat)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator BCE loss ``mean softplus(-D(x_hat))`` (= BCE with target 1)."""
    return F.softplus(-logits_fake).mean()


def get_gan_losses(kind: str = "hinge") -> tuple[Callable, Callable]:
    """``(d_loss(real, fake), g_loss(fake))`` for ``kind`` in {"hinge", "vanilla"}."""
    kind = kind.lower()
    if kind == "hinge":
        return hinge_d_loss, hinge_g_loss
    if kind in ("vanilla", "bce"):
        return vanilla_d_loss, vanilla_g_loss
    raise ValueError(f"gan loss must be 'hinge' or 'vanilla', got {kind!r}")


def adopt_weight(step: int, start: int, weight: float = 1.0, value: float = 0.0) -> float:
    """Delayed-start factor: ``value`` while ``step < start``, ``weight`` from ``step == start`` on.

    ``step`` counts completed generator updates (taming's ``global_step``, 0 at the first
    iteration), so ``start = 0`` switches the term on at once.
    """
    return float(value) if int(step) < int(start) else float(weight)


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float = 0.8,
    delta: float = 1e-6,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Taming's adaptive weight ``disc_weight * clamp(|grad rec| / (|grad g| + delta), 0, max_weight)``.

    Gradients are taken w.r.t. ``last_layer`` (the decoder's output conv weight) with the graph kept,
    so the caller can still back-propagate the total loss. The result is detached: it scales the
    adversarial term but receives no gradient (taming eq. 7; ``delta`` = 1e-6 in the paper).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(rec_grad) / (torch.norm(g_grad) + delta)
    return (torch.clamp(weight, 0.0, max_weight) * disc_weight).detach()
