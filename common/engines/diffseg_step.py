"""Training step of ImgX-DiffSeg: mask diffusion with recycling, and the non-diffusion baseline.

Paper A (Fu et al., arXiv 2303.06040; official ``imgx/exp/loss.py`` at tag v0.1.0) aligns training
with the 5-step sampler by *recycling*: the network's own prediction at the next (noisier) step,
computed without gradient, is noised again to build the training input ``x_k``; the loss compares
the prediction from ``x_k`` with the **true** mask. Paper B (MELBA 2023:016, arXiv 2308.16355)
recycles from the noisiest step instead (``xT``) and samples steps by importance.

Per batch (``recycling="next"``)::

    k ~ U{0..T-1};  k_re = min(k + 1, T - 1)
    x_re = q_sample(x0, k_re, eps1)
    with no_grad: x0_re = 2 softmax(net([I, x_re], k_re)) - 1       # stop-gradient
    x_k = q_sample(x0_re, k, eps2)                                 # eps1, eps2 independent
    loss = Dice_noBG + CE of net([I, x_k], k) against the true mask
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.engines.trainers import TrainingStep
from common.schedulers.diffseg import DiffSegScheduler

__all__ = ["ImportanceTimeSampler", "DiffSegStep"]


class ImportanceTimeSampler:
    """Importance sampling of diffusion steps (paper B), with the unbiased weight ``1 / (T p_k)``.

    Keeps an exponential moving average (``decay``) of the squared loss of every step. Until every
    step has ``min_count`` samples it samples uniformly (weight 1). Afterwards
    ``p(k) ∝ sqrt(E[L_k^2])`` mixed as ``(1 - uniform_mix) p + uniform_mix / T``.
    The official code multiplies the loss by ``T p_k`` (spec pitfall 2), which up-weights high-loss
    steps twice (once by sampling, once by weighting); dividing keeps the expected loss equal to the
    uniform-sampling loss.
    """

    def __init__(self, num_timesteps: int, decay: float = 0.9, min_count: int = 10, uniform_mix: float = 0.01) -> None:
        self.num_timesteps = int(num_timesteps)
        self.decay, self.min_count, self.uniform_mix = float(decay), int(min_count), float(uniform_mix)
        self.loss_sq = torch.zeros(self.num_timesteps, dtype=torch.float64)
        self.counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts >= self.min_count).all())

    def probabilities(self) -> torch.Tensor:
        """Current sampling distribution ``(T,)`` (uniform during warm-up)."""
        uniform = torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        if not self.warmed_up:
            return uniform
        p = self.loss_sq.clamp_min(0).sqrt()
        p = p / p.sum() if p.sum() > 0 else uniform
        return (1.0 - self.uniform_mix) * p + self.uniform_mix * uniform

    def weights(self, k: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """Loss weights ``1 / (T p_k)`` for step indices ``k``."""
        p = self.probabilities() if p is None else p
        return 1.0 / (self.num_timesteps * p[k.cpu()])

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, weight)``: ``batch`` step indices and their loss weights (float32)."""
        p = self.probabilities()
        k = torch.multinomial(p, batch, replacement=True, generator=generator)
        return k, self.weights(k, p).float()

    def update(self, k: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (detached) of the steps ``k``."""
        for ki, li in zip(k.cpu().tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ki] == 0:
                self.loss_sq[ki] = li**2
            else:
                self.loss_sq[ki] = self.decay * self.loss_sq[ki] + (1.0 - self.decay) * li**2
            self.counts[ki] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_sq": self.loss_sq.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_sq, self.counts = state["loss_sq"].detach().cpu().double().clone(), state["counts"].detach().cpu().long().clone()


class DiffSegStep(TrainingStep):
    """One optimisation step of ImgX-DiffSeg (or of its non-diffusion baseline).

    Args:
        network: :class:`common.networks.diffseg_unet.DiffSegUNet` (``in_channels = n_img + C``; ``n_img`` for the baseline).
        optimizer: optimiser of ``network``.
        loss_function: :class:`common.losses.segmentation.SegmentationLoss`.
        num_classes: C, background included.
        scheduler: :class:`DiffSegScheduler` (the T of training).
        diffusion: False trains the baseline: loss on ``network(image)``.
        recycling: ``"next"`` (paper A), ``"xT"`` (paper B) or ``"none"`` (standard training).
        time_sampling: ``"uniform"`` (paper A) or ``"importance"`` (paper B, weight ``1/(T p_k)``).
        model_out: ``"x0"`` (paper A: logits of the mask) or ``"epsilon"`` (ablation: the network
            predicts the noise; loss ``eps_weight * MSE + segmentation loss`` on the implied mask).
        eps_weight: weight of the MSE term for ``model_out="epsilon"``.
        grad_clip: global-norm gradient clipping (paper A: 1.0); ``None`` or 0 disables it.
        accumulation_steps: optimiser step every n iterations (effective batch n * batch).
        image_key, label_key: batch keys.
        seed: seed of the step's own generators (reproducible runs). Step indices come from a CPU
            generator; the noise is drawn **on the training device** (no CPU draw and copy of two
            mask-sized tensors per iteration): from that same CPU generator when training on the
            CPU, from a generator on the accelerator otherwise (seeded with ``seed``, its state saved
            in :meth:`state_dict`, so resumed runs continue the same noise on the same kind of device).

    Returns per iteration a dict with ``loss`` and its terms (``loss_dice``, ``loss_ce``,
    ``loss_focal``, ``loss_mse`` where enabled) as floats.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: nn.Module,
        num_classes: int,
        scheduler: DiffSegScheduler | None = None,
        diffusion: bool = True,
        recycling: str = "next",
        time_sampling: str = "uniform",
        model_out: str = "x0",
        eps_weight: float = 0.1,
        grad_clip: float | None = 1.0,
        accumulation_steps: int = 1,
        image_key: str = "image",
        label_key: str = "label",
        importance_kwargs: dict | None = None,
        seed: int | None = 0,
    ) -> None:
        if recycling not in ("next", "xT", "none"):
            raise ValueError(f"recycling must be 'next', 'xT' or 'none', got {recycling!r}")
        if time_sampling not in ("uniform", "importance"):
            raise ValueError(f"time_sampling must be 'uniform' or 'importance', got {time_sampling!r}")
        if model_out not in ("x0", "epsilon"):
            raise ValueError(f"model_out must be 'x0' or 'epsilon', got {model_out!r}")
        self.network, self.optimizer, self.loss_function = network, optimizer, loss_function
        self.num_classes = int(num_classes)
        self.scheduler = scheduler if scheduler is not None else DiffSegScheduler()
        self.diffusion, self.recycling, self.time_sampling, self.model_out = bool(diffusion), recycling, time_sampling, model_out
        self.eps_weight = float(eps_weight)
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.accumulation_steps = max(int(accumulation_steps), 1)
        self.image_key, self.label_key = image_key, label_key
        T = self.scheduler.num_timesteps
        if recycling == "xT" and T < 2:
            raise ValueError("recycling='xT' needs at least 2 steps")
        # xT draws k in {0..T-2} and recycles from T-1
        self.num_sampled_steps = T - 1 if recycling == "xT" else T
        self.importance = (
            ImportanceTimeSampler(self.num_sampled_steps, **(importance_kwargs or {})) if time_sampling == "importance" else None
        )
        self.seed = None if seed is None else int(seed)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        # noise generator on the accelerator, made on first use; a state loaded before that is kept
        self.device_generator: torch.Generator | None = None
        self._pending_device_state: tuple[str, torch.Tensor] | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.last_inputs: dict[str, torch.Tensor] = {}  # k, k_re, x_k of the last step (for inspection)

    # ------------------------------------------------------------------ pieces (tested one by one)
    def sample_steps(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, weight)`` of a batch: uniform (weight 1) or importance-sampled (weight 1/(T p_k))."""
        if self.importance is not None:
            return self.importance.sample(batch, self.generator)
        k = torch.randint(0, self.num_sampled_steps, (batch,), generator=self.generator)
        return k, torch.ones(batch)

    def noise_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator the noise of ``device`` is drawn from (the CPU one on the CPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.generator
        gen = self.device_generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            if self.seed is not None:
                gen.manual_seed(self.seed)
            else:
                gen.seed()
            if self._pending_device_state is not None and self._pending_device_state[0] == device.type:
                gen.set_state(self._pending_device_state[1])
            self._pending_device_state = None
            self.device_generator = gen
        return gen

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        gen = self.noise_generator(like.device)
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)

    def _predict_x0(self, out: torch.Tensor, x_k: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The mask in [-1, 1] implied by the network output (x0 logits or epsilon)."""
        if self.model_out == "x0":
            return self.scheduler.logits_to_x0(out)
        return 2.0 * self._eps_to_probs(out, x_k, k) - 1.0

    def _eps_to_probs(self, eps_hat: torch.Tensor, x_k: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Probabilities of ``x0 = (x_k - sqrt(1 - abar) eps) / sqrt(abar)``: clip to [-1, 1], (x+1)/2, renormalise."""
        x0 = self.scheduler.predict_x0_from_epsilon(x_k, k, eps_hat.float()).clamp(-1.0, 1.0)
        p = (x0 + 1.0) / 2.0
        return p / p.sum(1, keepdim=True).clamp_min(1e-6)

    def make_noisy_input(self, image: torch.Tensor, x0: torch.Tensor, k: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """The training input ``x_k`` (no gradient): recycled or directly noised from the true mask."""
        T = self.scheduler.num_timesteps
        if self.recycling == "none":
            return self.scheduler.q_sample(x0, k, self._noise(x0))
        k_re = torch.full_like(k, T - 1) if self.recycling == "xT" else torch.clamp(k + 1, max=T - 1)
        x_re = self.scheduler.q_sample(x0, k_re, self._noise(x0))
        with torch.no_grad(), torch.autocast(image.device.type, enabled=amp):
            out_re = self.network(torch.cat([image, x_re.to(image.dtype)], dim=1), k_re.to(image.device))
        x0_re = self._predict_x0(out_re.float(), x_re, k_re).detach()
        self.last_inputs["k_re"] = k_re
        return self.scheduler.q_sample(x0_re, k, self._noise(x0))

    def compute_loss(self, image: torch.Tensor, label: torch.Tensor, amp: bool = False) -> tuple[torch.Tensor, dict]:
        """Weighted scalar loss and per-term means for one batch."""
        if not self.diffusion:
            with torch.autocast(image.device.type, enabled=amp):
                logits = self.network(image)
            terms = self.loss_function(logits.float(), label)
            return terms["loss"], terms
        batch = image.shape[0]
        k, weight = self.sample_steps(batch)
        k, weight = k.to(image.device), weight.to(image.device)
        x0 = self.scheduler.mask_to_x0(label, self.num_classes).to(image.device)
        x_k = self.make_noisy_input(image, x0, k, amp).float()
        self.last_inputs.update(k=k, x_k=x_k)
        with torch.autocast(image.device.type, enabled=amp):
            out = self.network(torch.cat([image, x_k.to(image.dtype)], dim=1), k)
        out = out.float()
        if self.model_out == "x0":
            terms = self.loss_function(out, label, reduction="none")
        else:
            # the noise target is taken relative to the TRUE mask, so that the MSE and the
            # segmentation term push towards the same x0 even when x_k was recycled (ours)
            eps_target = self.scheduler.predict_epsilon_from_x0(x_k, k, x0)
            terms = self.loss_function(self._eps_to_probs(out, x_k, k), label, input_is_prob=True, reduction="none")
            terms["loss_mse"] = ((out - eps_target) ** 2).mean(dim=tuple(range(1, out.ndim)))
            terms["loss"] = terms["loss"] + self.eps_weight * terms["loss_mse"]
        if self.importance is not None:
            self.importance.update(k, terms["loss"])
        loss = (weight * terms["loss"]).mean()
        return loss, {name: v.mean() for name, v in terms.items()}

    # --------------------------------------------------------------------------------- step
    def __call__(self, engine: Any, batch: dict) -> dict[str, Any]:
        device = engine.state.device
        amp = bool(getattr(engine, "amp", False)) and torch.device(device).type == "cuda"
        if amp and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        image = batch[self.image_key].to(device).float()
        label = batch[self.label_key].to(device)
        self.network.train()
        it = int(engine.state.iteration)  # 1-based
        if (it - 1) % self.accumulation_steps == 0:
            self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.compute_loss(image, label, amp)
        scaled = loss / self.accumulation_steps
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if it % self.accumulation_steps == 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        terms["loss"] = loss
        return self.detach(terms)

    def state_dict(self) -> dict[str, Any]:
        """Importance statistics and generator state, so a resumed run continues the same way."""
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.device_generator is not None:
            state["device_generator"] = self.device_generator.get_state()
            state["device_type"] = self.device_generator.device.type
        elif self._pending_device_state is not None:
            state["device_type"], state["device_generator"] = self._pending_device_state
        if self.importance is not None:
            state["importance"] = self.importance.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        if "device_generator" in state:
            device_type = str(state.get("device_type", "cuda"))
            if self.device_generator is not None and self.device_generator.device.type == device_type:
                self.device_generator.set_state(state["device_generator"].cpu())
            else:
                self.device_generator = None
                self._pending_device_state = (device_type, state["device_generator"].cpu())
        if self.importance is not None and "importance" in state:
            self.importance.load_state_dict(state["importance"])
