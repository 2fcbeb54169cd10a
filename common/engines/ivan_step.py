"""Training step of iVAN (bidirectional loss ``L = lambda * L_fwd + L_rev``) for :class:`StepTrainer`.

Official ``train.py`` of ``yqx7150/iVAN``, per 2D slice stack:

1. ``y_hat = clamp(f(X_aug), 0, 1)``;
2. ``L_fwd = MSE(P(y_hat), Y)`` with ``P`` the channel-group mean (``forward_loss="channel_mean"``), or
   ``MSE(y_hat, Y_aug)`` over all channels (``"full"``; always used by ``dummy_copy`` and ``zeros``);
3. ``X_hat = clamp(f^-1(y_hat), 0, 1)``: the inverse runs on the *clamped forward output*
   (``reverse_input="forward_output"``, code) or on the target ``Y_aug`` (``"target"``, the paper's formula
   ``lambda ||f(X) - Y|| + ||f^-1(Y) - X||``);
4. ``L_rev = MSE(X_hat, X_aug)``;
5. ``L = lambda * L_fwd + L_rev`` (``lambda = 1``). Gradients pass through the clamps.

Not in the official code: ``range_weight > 0`` adds ``range_weight * mean(relu(-f(X))^2 + relu(f(X) - 1)^2)``
on the *unclamped* forward output. ``torch.clamp`` passes no gradient outside [0, 1], and with the
channel-mean loss two output channels can leave the range in opposite directions while their clamped mean
sits at 0.5: measured here, a T1 -> T2 demo model trained with the official loss ended with its channels at
1.9-4.0 and -6.7 to -3.2 inside the brain and a constant prediction. The penalty keeps every channel where
the clamp still passes gradient; ``0`` (the default of ``train.json``) is the official loss.

The code's ``--loss L1`` flag has no effect; here ``loss="l1"`` really switches both terms to L1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engines.trainers import TrainingStep
from common.networks.ivan import group_mean

__all__ = ["IVANStep", "ivan_losses"]


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
    range_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The loss terms of one iVAN step: ``{"loss", "loss_fwd", "loss_rev", "loss_range"}`` (tensors with graph)."""
    if forward_loss not in ("channel_mean", "full"):
        raise ValueError(f"forward_loss must be 'channel_mean' or 'full', got {forward_loss!r}")
    if reverse_input not in ("forward_output", "target"):
        raise ValueError(f"reverse_input must be 'forward_output' or 'target', got {reverse_input!r}")
    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
    dist = F.mse_loss if loss == "mse" else F.l1_loss
    if range_weight < 0:
        raise ValueError(f"range_weight must be >= 0, got {range_weight!r}")
    y_raw = network(x_aug)
    loss_range = (F.relu(-y_raw) ** 2 + F.relu(y_raw - 1.0) ** 2).mean()
    y_hat = torch.clamp(y_raw, 0.0, 1.0)
    if augmentation == "replicate" and forward_loss == "channel_mean":
        loss_fwd = dist(group_mean(y_hat, n_out), y_aug[:, :n_out])
    else:
        loss_fwd = dist(y_hat, y_aug)
    rev_in = y_hat if reverse_input == "forward_output" else y_aug
    x_hat = torch.clamp(network(rev_in, rev=True), 0.0, 1.0)  # rev=True: also through a DDP wrapper
    loss_rev = dist(x_hat, x_aug)
    loss_total = lam * loss_fwd + loss_rev
    if range_weight > 0:
        loss_total = loss_total + range_weight * loss_range
    return {"loss": loss_total, "loss_fwd": loss_fwd, "loss_rev": loss_rev, "loss_range": loss_range.detach()}


class IVANStep(TrainingStep):
    """One optimisation step of iVAN on a batch ``{image_key: X_aug (B,C,H,W), label_key: Y_aug (B,C,H,W)}``.

    Returns ``{"loss", "loss_fwd", "loss_rev", "loss_range", "lr"}`` as Python floats (logged by StatsHandler/MLflow).

    Args:
        network: an :class:`common.networks.ivan.IVAN`.
        optimizer: its optimiser.
        n_out: number of target modalities.
        augmentation, forward_loss, reverse_input, loss, lam, range_weight: see :func:`ivan_losses`.
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
        range_weight: float = 0.0,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.network, self.optimizer = network, optimizer
        self.kwargs = dict(
            n_out=int(n_out), augmentation=augmentation, forward_loss=forward_loss,
            reverse_input=reverse_input, loss=loss, lam=float(lam), range_weight=float(range_weight),
        )
        if float(range_weight) < 0:
            raise ValueError(f"range_weight must be >= 0, got {range_weight!r}")
        if forward_loss not in ("channel_mean", "full") or reverse_input not in ("forward_output", "target") or loss not in ("mse", "l1"):
            raise ValueError(f"invalid iVAN loss options: {forward_loss!r}, {reverse_input!r}, {loss!r}")
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
