"""Training step of iVAN (bidirectional loss ``L = lambda * L_fwd + L_rev``) for :class:`StepTrainer`.

Official ``train.py`` of ``yqx7150/iVAN``, per 2D slice stack:

1. ``y_hat = clamp(f(X_aug), 0, 1)``;
2. ``L_fwd = MSE(P(y_hat), Y)`` with ``P`` the channel-group mean (``forward_loss="channel_mean"``), or
   ``MSE(y_hat, Y_aug)`` over all channels (``"full"``; always used by ``dummy_copy`` and ``zeros``);
3. ``X_hat = clamp(f^-1(y_hat), 0, 1)``: the inverse runs on the *clamped forward output*
   (``reverse_input="forward_output"``, code) or on the target ``Y_aug`` (``"target"``, the paper's formula
   ``lambda ||f(X) - Y|| + ||f^-1(Y) - X||``);
4. ``L_rev = MSE(X_hat, X_aug)``;
5. ``L = lambda * L_fwd + L_rev`` (``lambda = 1``).

``clamp_gradient`` says what the clamps of steps 1 and 3 pass back. ``"zero"`` is ``torch.clamp`` as in the
official code: no gradient where a value lies outside ``[0, 1]``. With the channel-mean loss that lets training
collapse: the two output channels of a ``[T1, T1]`` input can leave ``[0, 1]`` in opposite directions, their
clamped mean is then the constant 0.5 and no gradient reaches them any more (measured on a T1->T2 demo model
trained this way: inside the brain channel 0 lay at 1.9-4.0 and channel 1 at -6.7 to -3.2, the prediction was
0.50 +- 0.01 everywhere). ``"straight_through"`` (default) clamps the values but passes the gradient through
unchanged, so a saturated channel is still pulled back towards its target.

The code's ``--loss L1`` flag has no effect; here ``loss="l1"`` really switches both terms to L1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engines.trainers import TrainingStep
from common.networks.ivan import group_mean

__all__ = ["IVANStep", "clamp_unit", "ivan_losses"]

CLAMP_GRADIENTS = ("zero", "straight_through")


def clamp_unit(x: torch.Tensor, gradient: str = "straight_through") -> torch.Tensor:
    """``x`` clamped to ``[0, 1]``; ``gradient="straight_through"`` passes the gradient as if unclamped."""
    if gradient == "zero":
        return torch.clamp(x, 0.0, 1.0)
    if gradient != "straight_through":
        raise ValueError(f"clamp_gradient must be one of {CLAMP_GRADIENTS}, got {gradient!r}")
    return x + (torch.clamp(x, 0.0, 1.0) - x).detach()


def ivan_losses(
    network: nn.Module,
    x_aug: torch.Tensor,
    y_aug: torch.Tensor,
    n_out: int,
    augmentation: str = "replicate",
    forward_loss: str = "channel_mean",
    reverse_input: str = "forward_output",
    loss: str = "mse",
    lam: float = 1.0,
    clamp_gradient: str = "straight_through",
) -> dict[str, torch.Tensor]:
    """The loss terms of one iVAN step: ``{"loss", "loss_fwd", "loss_rev"}`` (tensors with graph)."""
    if forward_loss not in ("channel_mean", "full"):
        raise ValueError(f"forward_loss must be 'channel_mean' or 'full', got {forward_loss!r}")
    if reverse_input not in ("forward_output", "target"):
        raise ValueError(f"reverse_input must be 'forward_output' or 'target', got {reverse_input!r}")
    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
    if clamp_gradient not in CLAMP_GRADIENTS:
        raise ValueError(f"clamp_gradient must be one of {CLAMP_GRADIENTS}, got {clamp_gradient!r}")
    dist = F.mse_loss if loss == "mse" else F.l1_loss
    y_hat = clamp_unit(network(x_aug), clamp_gradient)
    if augmentation == "replicate" and forward_loss == "channel_mean":
        loss_fwd = dist(group_mean(y_hat, n_out), y_aug[:, :n_out])
    else:
        loss_fwd = dist(y_hat, y_aug)
    rev_in = y_hat if reverse_input == "forward_output" else y_aug
    x_hat = clamp_unit(network(rev_in, rev=True), clamp_gradient)  # rev=True: also through a DDP wrapper
    loss_rev = dist(x_hat, x_aug)
    return {"loss": lam * loss_fwd + loss_rev, "loss_fwd": loss_fwd, "loss_rev": loss_rev}


class IVANStep(TrainingStep):
    """One optimisation step of iVAN on a batch ``{image_key: X_aug (B,C,H,W), label_key: Y_aug (B,C,H,W)}``.

    Returns ``{"loss", "loss_fwd", "loss_rev", "lr"}`` as Python floats (logged by StatsHandler/MLflow).

    Args:
        network: an :class:`common.networks.ivan.IVAN`.
        optimizer: its optimiser.
        n_out: number of target modalities.
        augmentation, forward_loss, reverse_input, loss, lam, clamp_gradient: see :func:`ivan_losses`.
        image_key, label_key: batch keys.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        n_out: int = 1,
        augmentation: str = "replicate",
        forward_loss: str = "channel_mean",
        reverse_input: str = "forward_output",
        loss: str = "mse",
        lam: float = 1.0,
        clamp_gradient: str = "straight_through",
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.network, self.optimizer = network, optimizer
        self.kwargs = dict(
            n_out=int(n_out), augmentation=augmentation, forward_loss=forward_loss,
            reverse_input=reverse_input, loss=loss, lam=float(lam), clamp_gradient=clamp_gradient,
        )
        if forward_loss not in ("channel_mean", "full") or reverse_input not in ("forward_output", "target") or loss not in ("mse", "l1") or clamp_gradient not in CLAMP_GRADIENTS:
            raise ValueError(
                f"invalid iVAN loss options: {forward_loss!r}, {reverse_input!r}, {loss!r}, {clamp_gradient!r}"
            )
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, engine: Any, batch: dict) -> dict[str, Any]:
        device = engine.state.device
        x = batch[self.image_key].to(device, non_blocking=True).float()
        y = batch[self.label_key].to(device, non_blocking=True).float()
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        use_amp = bool(getattr(engine, "amp", False)) and torch.device(device).type == "cuda"
        with torch.autocast("cuda", enabled=use_amp):
            terms = ivan_losses(self.network, torch.as_tensor(x), torch.as_tensor(y), **self.kwargs)
        scaler = getattr(engine, "scaler", None)
        if use_amp and scaler is not None:
            scaler.scale(terms["loss"]).backward()
            scaler.step(self.optimizer)
            scaler.update()
        else:
            terms["loss"].backward()
            self.optimizer.step()
        out = self.detach(terms)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return out
