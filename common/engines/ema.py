"""Exponential moving average of a network's weights (LitEma warm-up), checkpointable.

The latent diffusion model of ALDM (v1, after CompVis ``ldm/modules/ema.py``) keeps an EMA of
the UNet weights with decay 0.9999 and a warm-up: update ``n`` (1-based) uses

    d_n = min(decay, (1 + n) / (10 + n))

so the average follows the raw weights closely early in training. Validation and sampling use
the EMA weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """EMA copy of ``model``: ``ema.update(model)`` after every optimiser step.

    The averaged network is ``ema.module`` (a deep copy, no gradients) and ``ema(*args)`` calls
    it, so an EMA object can be handed to a sampler wherever the raw network would go.
    Being an ``nn.Module``, its ``state_dict`` holds the averaged weights and the update count,
    so ``CheckpointSaver``/``CheckpointLoader`` save and restore it with the rest of a run.

    Args:
        model: network whose weights are averaged (its current weights initialise the average).
        decay: maximal decay (0.9999 in ALDM / LDM).
        warmup: use the LitEma warm-up ``min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def current_decay(self, num_updates: int | None = None) -> float:
        """Decay used by update number ``num_updates`` (1-based; default the next update)."""
        n = int(self.num_updates) + 1 if num_updates is None else int(num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average towards ``model``'s weights; returns the decay used."""
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        decay = self.current_decay()
        self.num_updates += 1
        src = dict(model.named_parameters())
        for name, p_ema in self.module.named_parameters():
            p = src[name].detach()
            p_ema.sub_((1.0 - decay) * (p_ema - p.to(p_ema.dtype)))
        # buffers (e.g. norm statistics) are copied, not averaged, as in LitEma-style EMAs
        src_buf = dict(model.named_buffers())
        for name, b_ema in self.module.named_buffers():
            b_ema.copy_(src_buf[name])
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        model.load_state_dict(self.module.state_dict())

    def train(self, mode: bool = True) -> EMA:
        # the averaged copy always runs in eval mode (dropout off)
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
