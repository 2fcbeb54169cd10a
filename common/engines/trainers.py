"""A trainer whose iteration is a pluggable *training step*.

Every method here trains with a different mix of networks, optimisers and loss terms (VQ-GAN
with a delayed discriminator, latent SPADE with a cycle term, diffusion with recycling, an
invertible network with a forward and a reverse term). Instead of one trainer class per method,
:class:`StepTrainer` runs Ignite's loop, AMP and handlers, and delegates one iteration to a
``step`` object that owns the networks, optimisers and losses of that method. A step returns a
dict of loss terms; ``loss`` is the total, the other keys are logged one by one (StatsHandler,
TensorBoard, MLflow).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch

__all__ = ["StepTrainer", "TrainingStep", "autocast", "optimizer_step", "freeze", "no_param_grads", "unwrap", "engine_device"]


def engine_device(engine: Any) -> torch.device:
    """The device an engine runs on (``engine.state.device`` once running, else ``engine.device``)."""
    return torch.device(getattr(engine.state, "device", None) or getattr(engine, "device", "cpu"))


def autocast(engine: Any):
    """Mixed-precision context when the engine has AMP on and runs on CUDA, a no-op otherwise; the engine's
    ``amp_kwargs`` (e.g. ``{"dtype": torch.bfloat16}``) choose the precision, float16 by default."""
    device = engine_device(engine)
    if getattr(engine, "amp", False) and device.type == "cuda":
        return torch.autocast(device.type, **(getattr(engine, "amp_kwargs", None) or {}))
    return nullcontext()


def optimizer_step(
    engine: Any, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable | None = None, grad_clip: float | None = None
) -> None:
    """zero_grad, backward, optional global-norm clipping and step, through the engine's GradScaler under AMP."""
    scaler = getattr(engine, "scaler", None) if getattr(engine, "amp", False) else None
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params or _params(optimizer)), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params or _params(optimizer)), grad_clip)
        optimizer.step()


def _params(optimizer: torch.optim.Optimizer):
    return (p for group in optimizer.param_groups for p in group["params"])


def freeze(*modules: torch.nn.Module | None) -> None:
    """Eval mode and no gradients: the frozen networks of earlier stages stay bit-identical."""
    for m in modules:
        if m is not None:
            m.eval()
            m.requires_grad_(False)


@contextmanager
def no_param_grads(*modules: torch.nn.Module) -> Iterator[None]:
    """Run ``modules`` without accumulating gradients into their parameters; flags restored after.

    Gradients still flow *through* them (a generator's adversarial term backpropagates through
    the discriminator without touching the discriminator's own gradients).
    """
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (itself otherwise)."""
    return getattr(module, "module", module)


class TrainingStep(ABC):
    """Base class of a training step: ``step(engine, batch) -> {"loss": float, "loss_x": float, ...}``.

    Subclasses implement :meth:`__call__`. ``engine.state.iteration`` gives the global step (for
    delayed adversarial terms), ``engine.amp`` and ``engine.scaler`` the mixed-precision
    settings, ``engine.state.device`` the device.
    """

    @abstractmethod
    def __call__(self, engine: Trainer, batch: Any) -> dict[str, Any]:
        """One iteration: update the networks, return the loss terms."""

    @staticmethod
    def detach(losses: dict[str, Any]) -> dict[str, Any]:
        """Loss tensors turned into Python floats for logging (keeps the graph out of the state)."""
        return {k: (v.detach().float().item() if torch.is_tensor(v) and v.numel() == 1 else v) for k, v in losses.items()}


class StepTrainer(Trainer):
    """``monai.engines.Trainer`` that calls ``step(engine, batch)`` once per iteration.

    Args:
        device: device to run on.
        max_epochs: number of epochs.
        train_data_loader: data loader (or any iterable of batches).
        step: the method's :class:`TrainingStep`.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        train_handlers: Ignite handlers with ``attach``.
        amp: mixed precision (CUDA only; ignored on CPU).
        non_blocking, prepare_batch, key_train_metric, additional_metrics, metric_cmp_fn,
        event_names, event_to_attr, to_kwargs, amp_kwargs: as in ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        step: Callable[[Trainer, Any], dict[str, Any]],
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        device = torch.device(device)
        kwargs = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=bool(amp) and device.type == "cuda",
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **kwargs,
        )
        self.step = step

    def _iteration(self, engine: Trainer, batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("the data loader returned an empty batch (None)")
        out = self.step(engine, batchdata)
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError(f"{type(self.step).__name__} must return a dict with a 'loss' key, got {type(out).__name__}")
        for key, lr in self.learning_rates().items():
            out.setdefault(key, lr)
        return out

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of every optimiser the step holds, for logging and tracking.

        One optimiser gives ``lr``; several give ``lr_<attribute>`` (``lr_optimizer_g``, ...).
        """
        found = [(name, opt) for name, opt in vars(self.step).items() if isinstance(opt, torch.optim.Optimizer)]
        if len(found) == 1:
            return {"lr": float(found[0][1].param_groups[0]["lr"])}
        return {f"lr_{name}": float(opt.param_groups[0]["lr"]) for name, opt in found}
