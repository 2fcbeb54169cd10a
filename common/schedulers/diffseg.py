"""Variance schedule and update maths of mask-space diffusion (ImgX-DiffSeg).

Paper A (Fu et al., "Importance of Aligning Training Strategy with Evaluation for Diffusion Models
in 3D Multiclass Segmentation", arXiv 2303.06040) trains and samples with the *same* five steps.
The five-step schedule is resampled from the usual linear schedule (beta in [1e-4, 0.02] over
1001 steps, official ``imgx/diffusion/variance_schedule.py`` at tag v0.1.0): the cumulative
product alpha-bar of the 1001 betas is kept at indices {0, 250, 500, 750, 1000} and the betas are
recomputed from consecutive alpha-bars,

    beta'_0 = beta_0,  beta'_k = 1 - abar_k / abar_{k-1}.

Indices are 0-based: step 0 is the least noisy, step T-1 the noisiest. The masks live in
``[-1, 1]``: ``x0 = 2 * onehot(y) - 1`` and the network's prediction is ``2 * softmax(logits) - 1``.

The first public release sliced alpha-bar with ``[199::200]`` and obtained four betas for five
steps (spec pitfall 4): :func:`resampled_linear_betas` asserts exactly ``num_timesteps`` entries.
The reverse variance is "fixed_large" (sigma_k^2 = beta'_k) and no noise is added at k = 0
(ImgX-DiffSeg issues #7/#8); DDIM uses sqrt(abar_{k-1}) (issue #5) and a standard deviation,
not a log-variance, when eta > 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["resampled_linear_betas", "DiffSegScheduler", "warmup_cosine_lambda"]


def resampled_linear_betas(
    num_timesteps: int = 5, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps_beta: int = 1001
) -> torch.Tensor:
    """``num_timesteps`` betas resampled from a linear schedule of ``num_timesteps_beta`` steps.

    Returns a float64 tensor of length ``num_timesteps``. With ``num_timesteps == num_timesteps_beta``
    the linear schedule itself is returned.
    """
    if num_timesteps < 1 or num_timesteps > num_timesteps_beta:
        raise ValueError(f"need 1 <= num_timesteps <= num_timesteps_beta, got {num_timesteps}, {num_timesteps_beta}")
    betas = torch.linspace(beta_start, beta_end, num_timesteps_beta, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if num_timesteps == 1:
        idx = torch.tensor([num_timesteps_beta - 1])
    else:
        # evenly spaced indices including both ends: {0, 250, 500, 750, 1000} for 5 of 1001
        idx = torch.round(torch.linspace(0, num_timesteps_beta - 1, num_timesteps, dtype=torch.float64)).long()
    abar_k = abar[idx]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar_k[:-1]])
    new_betas = 1.0 - abar_k / prev
    # beta'_0 = 1 - abar_0 = beta_0 because index 0 is kept
    if new_betas.numel() != num_timesteps:  # pitfall 4 of the spec
        raise AssertionError(f"schedule has {new_betas.numel()} entries for {num_timesteps} steps")
    return new_betas


def _gather(values: torch.Tensor, k: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """``values[k]`` broadcast to the shape of ``like`` (batch first)."""
    if not torch.is_tensor(k):
        k = torch.full((like.shape[0],), int(k), dtype=torch.long)
    out = values.to(device=like.device)[k.to(device=like.device, dtype=torch.long)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class DiffSegScheduler:
    """Forward noising, posterior and DDPM/DDIM updates on the resampled schedule.

    Args:
        num_timesteps: number of diffusion steps T used for training and sampling (paper A: 5).
        beta_start, beta_end, num_timesteps_beta: the linear schedule the T steps are resampled from
            (paper A: 1e-4, 0.02, 1001).

    Attributes (float64 tensors of length T): ``betas`` (beta'), ``alphas_cumprod`` (abar),
    ``alphas_cumprod_prev`` (abar_{k-1} with abar_{-1} = 1).
    """

    def __init__(
        self, num_timesteps: int = 5, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps_beta: int = 1001
    ) -> None:
        self.num_timesteps = int(num_timesteps)
        self.betas = resampled_linear_betas(num_timesteps, beta_start, beta_end, num_timesteps_beta)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # posterior q(x_{k-1} | x_k, x0) = N(coef_x0 * x0 + coef_xk * x_k, ...)
        self.posterior_coef_x0 = self.alphas_cumprod_prev.sqrt() * self.betas / (1.0 - self.alphas_cumprod)
        self.posterior_coef_xk = (1.0 - self.betas).sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------- masks <-> diffusion space
    @staticmethod
    def mask_to_x0(label: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(B, 1, *S)`` integer label -> ``(B, C, *S)`` in {-1, 1}: ``2 * onehot - 1``."""
        onehot = torch.nn.functional.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1)
        return 2.0 * onehot.float() - 1.0

    @staticmethod
    def logits_to_x0(logits: torch.Tensor) -> torch.Tensor:
        """``2 * softmax(logits) - 1`` over the class channel; sums to ``2 - C`` over channels."""
        probs = torch.softmax(logits.float(), dim=1)
        if probs.requires_grad:
            # one temporary, not two: the product's own storage takes the "- 1" (autograd keeps the softmax output
            # for its backward, so that one must stay as it is)
            return (2.0 * probs).sub_(1.0)
        return probs.mul_(2.0).sub_(1.0)  # no graph: the softmax output is the only full-volume temporary

    # ----------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, k: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise``; ``k`` is an int or a ``(B,)`` tensor."""
        abar = _gather(self.alphas_cumprod, k, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0_from_epsilon(self, x_k: torch.Tensor, k: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """``(x_k - sqrt(1 - abar_k) eps) / sqrt(abar_k)``."""
        abar = _gather(self.alphas_cumprod, k, x_k)
        return (x_k - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def predict_epsilon_from_x0(self, x_k: torch.Tensor, k: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """``(x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k)``."""
        abar = _gather(self.alphas_cumprod, k, x_k)
        return (x_k - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    # ----------------------------------------------------------------------- reverse process
    def posterior_mean(self, x0_hat: torch.Tensor, x_k: torch.Tensor, k: int) -> torch.Tensor:
        """Mean of q(x_{k-1} | x_k, x0_hat); at k = 0 it is ``x0_hat`` itself (no further step)."""
        if int(k) == 0:
            return x0_hat
        c0 = _gather(self.posterior_coef_x0, k, x_k)
        ck = _gather(self.posterior_coef_xk, k, x_k)
        return c0 * x0_hat + ck * x_k

    def posterior_std(self, k: int) -> float:
        """"fixed_large" standard deviation sqrt(beta'_k) for k >= 1; 0 at k = 0."""
        return 0.0 if int(k) == 0 else float(self.betas[int(k)].sqrt())

    def ddim_std(self, k: int, eta: float) -> float:
        """sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1}) (a std, not a log-variance)."""
        if int(k) == 0:
            return 0.0
        a, a_prev = float(self.alphas_cumprod[k]), float(self.alphas_cumprod_prev[k])
        return float(eta) * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)

    def step(
        self,
        x0_hat: torch.Tensor,
        x_k: torch.Tensor,
        k: int,
        sampler: str = "ddpm",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One reverse step ``x_k -> x_{k-1}`` given the predicted mask ``x0_hat`` (returns ``x0_hat`` at k = 0).

        ``sampler="ddpm"``: ``mu_k + sqrt(beta'_k) z``. ``sampler="ddim"``:
        ``sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - sigma^2) eps_hat + sigma z`` with
        ``eps_hat = (x_k - sqrt(abar_k) x0_hat) / sqrt(1 - abar_k)``; eta = 0 is deterministic.
        ``z ~ N(0, I)`` is drawn from ``generator``, or is ``noise`` where the caller drew it already (a sampler
        drawing it while the network runs; it is overwritten); a step with :meth:`draws_noise` False uses none.
        """
        k = int(k)
        if k == 0:
            return x0_hat
        # both samplers' mean is one weighted sum c0 x0_hat + ck x_k
        if sampler == "ddpm":
            std = self.posterior_std(k)  # > 0 for every k >= 1
            c0, ck = float(self.posterior_coef_x0[k]), float(self.posterior_coef_xk[k])
        elif sampler == "ddim":
            std = self.ddim_std(k, eta)
            a, a_prev = float(self.alphas_cumprod[k]), float(self.alphas_cumprod_prev[k])
            # sqrt(a_prev) x0_hat + c_eps eps_hat with eps_hat = (x_k - sqrt(a) x0_hat) / sqrt(1 - a), expanded
            c_eps = math.sqrt(max(1.0 - a_prev - std**2, 0.0)) / math.sqrt(1.0 - a)
            c0, ck = math.sqrt(a_prev) - c_eps * math.sqrt(a), c_eps
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if std == 0.0:
            return torch.add(x_k * ck, x0_hat, alpha=c0)
        # mean + std z accumulated into the noise tensor itself: a full-volume sampler step then allocates the
        # noise and nothing else (the sum is the same up to float32 rounding of the order of terms)
        z = noise if noise is not None else torch.randn(x_k.shape, generator=generator, device=x_k.device, dtype=x_k.dtype)
        return z.mul_(std).add_(x_k, alpha=ck).add_(x0_hat, alpha=c0)

    def draws_noise(self, k: int, sampler: str = "ddpm", eta: float = 0.0) -> bool:
        """Whether :meth:`step` at ``k`` draws ``z`` (every DDPM step but the last; DDIM only with ``eta > 0``)."""
        k = int(k)
        if k == 0:
            return False
        return (self.posterior_std(k) if sampler == "ddpm" else self.ddim_std(k, eta)) != 0.0


def warmup_cosine_lambda(
    warmup_steps: int = 100,
    decay_steps: int = 10_000,
    init_lr: float = 1e-5,
    peak_lr: float = 1e-4,
    end_lr: float = 1e-6,
):
    """Multiplier (relative to ``peak_lr``) of paper A's learning-rate schedule, for ``LambdaLR``.

    Linear warm-up ``init_lr -> peak_lr`` over ``warmup_steps``, cosine decay to ``end_lr`` at
    ``decay_steps``, then constant: ``lr = end + (peak - end) * 0.5 * (1 + cos(pi (s - w) / (D - w)))``.
    The optimiser's base learning rate must be ``peak_lr``.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            lr = init_lr + (peak_lr - init_lr) * step / max(warmup_steps, 1)
        elif step < decay_steps:
            frac = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
            lr = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        else:
            lr = end_lr
        return lr / peak_lr

    return fn
