"""Conditional latent diffusion sampler (DDIM or DDPM) as a MONAI ``Inferer``.

Method-agnostic: the caller encodes its conditioning into a tensor ``cond`` on the latent grid;
at every step the network sees ``concat[cond, z_t]`` along channels (plus an optional
cross-attention ``context`` and/or ``class_labels``) and predicts what the scheduler expects
(epsilon for ALDM). Decoding the returned latent is the caller's business.

DDIM timesteps. The LDM/ALDM samplers visit ``range(0, T, T // S) + 1`` in reverse, e.g.
``996, 991, ..., 6, 1`` for ``T = 1000``, ``S = 200`` (``timestep_spacing="leading"``), and
use ``alpha_bar_0`` as the "previous" value of the last step (``set_alpha_to_one=False``).
MONAI 1.6.1's ``DDIMScheduler.set_timesteps`` uses a rounded linspace instead
(``999, 994, ..., 6, 1``; ``timestep_spacing="linspace"``), a negligible difference kept as an
option. Either way ``DDIMScheduler.step`` takes the previous timestep as ``t - T // S``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.utils import optional_import

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["LatentDiffusionSampler", "set_sampling_timesteps"]


def set_sampling_timesteps(
    scheduler: DDIMScheduler | DDPMScheduler,
    num_inference_steps: int,
    timestep_spacing: str = "leading",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Set ``scheduler.timesteps`` for ``num_inference_steps`` and return them.

    ``"leading"``: ``arange(S) * (T // S) + steps_offset``, reversed (official LDM/ALDM DDIM);
    ``"linspace"``: MONAI's own ``set_timesteps``. DDPM always uses its own (leading) spacing.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    if isinstance(scheduler, DDIMScheduler):
        if timestep_spacing == "leading":
            ratio = scheduler.num_train_timesteps // num_inference_steps
            steps = torch.arange(num_inference_steps, device=device, dtype=torch.long) * ratio
            scheduler.timesteps = steps.flip(0) + scheduler.steps_offset
        elif timestep_spacing != "linspace":
            raise ValueError(f"timestep_spacing must be 'leading' or 'linspace', got {timestep_spacing!r}")
    return scheduler.timesteps


class LatentDiffusionSampler(Inferer):
    """Sample a latent by reverse diffusion conditioned on a concatenated tensor.

    Args:
        scheduler: MONAI ``DDIMScheduler`` or ``DDPMScheduler`` (the training schedule).
        num_inference_steps: number of reverse steps (ALDM: DDIM 200; DDPM: 1000).
        eta: DDIM stochasticity (1.0 = ALDM official, 0.0 = deterministic DDIM); ignored by DDPM.
        latent_channels: channels of the sampled latent (default: the channels of ``inputs``).
        timestep_spacing: ``"leading"`` (official LDM) or ``"linspace"`` (MONAI); DDIM only.
        seed: default seed of the noise generator (``None``: the global RNG).
        progress: show a tqdm progress bar.

    Call: ``sampler(inputs, network, context=None, class_labels=None, seed=None, noise=None)``

    - ``inputs``: conditioning ``(N, C_cond, *spatial)``; the network gets
      ``concat[inputs, z_t]`` of ``C_cond + latent_channels`` channels;
    - ``noise``: optional initial ``z_T`` ``(N, latent_channels, *spatial)``;
    - returns ``z_0`` ``(N, latent_channels, *spatial)``.

    With the same seed (or the same ``noise`` and ``eta = 0``) two calls give identical outputs.
    """

    def __init__(
        self,
        scheduler: DDIMScheduler | DDPMScheduler,
        num_inference_steps: int = 200,
        eta: float = 1.0,
        latent_channels: int | None = None,
        timestep_spacing: str = "leading",
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            raise TypeError(f"scheduler must be a MONAI DDIMScheduler or DDPMScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.eta = float(eta)
        self.latent_channels = latent_channels
        self.timestep_spacing = timestep_spacing
        self.seed = seed
        self.progress = progress

    def _generator(self, device: torch.device, seed: int | None) -> torch.Generator | None:
        seed = self.seed if seed is None else seed
        if seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(seed))

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        steps = self.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        eta = self.eta if eta is None else float(eta)
        device = inputs.device
        generator = self._generator(device, seed)
        channels = inputs.shape[1] if self.latent_channels is None else self.latent_channels
        shape: Sequence[int] = (inputs.shape[0], channels, *inputs.shape[2:])
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=device, dtype=inputs.dtype)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        timesteps = set_sampling_timesteps(self.scheduler, steps, self.timestep_spacing, device=device)
        cond_kwargs = dict(kwargs)
        if context is not None:
            cond_kwargs["context"] = context
        if class_labels is not None:
            cond_kwargs["class_labels"] = class_labels

        z = noise
        loop = tqdm(timesteps, desc="sampling", leave=False) if (self.progress and has_tqdm) else timesteps
        for t in loop:
            t_batch = torch.full((z.shape[0],), int(t), device=device, dtype=torch.long)
            model_output = network(torch.cat([inputs, z], dim=1), t_batch, *args, **cond_kwargs)
            if isinstance(self.scheduler, DDIMScheduler):
                z, _ = self.scheduler.step(model_output, int(t), z, eta=eta, generator=generator)
            else:
                z, _ = self.scheduler.step(model_output, int(t), z, generator=generator)
        return z
