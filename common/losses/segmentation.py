"""Multi-class segmentation losses: soft Dice without background over present classes, CE, focal.

Paper A (Fu et al., arXiv 2303.06040; official ``imgx/exp/loss.py`` at v0.1.0) trains with
``1.0 * Dice + 1.0 * CE``. The Dice term is computed per (sample b, class c >= 1) as
``d_bc = 1 - 2 sum(p q) / (sum p + sum q)`` and pairs whose class is absent from the sample's
ground truth (``sum q = 0``) are excluded (the official code produces NaN there and takes a
nanmean). MONAI's ``DiceLoss`` counts absent classes (a near-zero loss for a correctly empty
prediction, a large one otherwise), which is why this module exists. Paper B (MELBA 2023:016)
uses a focal term (gamma = 2) instead of CE.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["dice_loss_per_class", "SegmentationLoss"]


def dice_loss_per_class(
    probs: torch.Tensor, onehot: torch.Tensor, include_background: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice loss per (sample, class) and the mask of classes present in the ground truth.

    Args:
        probs: ``(B, C, *S)`` class probabilities.
        onehot: ``(B, C, *S)`` one-hot ground truth.
        include_background: keep channel 0.

    Returns:
        ``(loss, present)``, both ``(B, C')``: ``1 - 2 sum(pq) / (sum p + sum q)`` and
        ``sum q > 0``. Entries of absent classes are 0 (finite, no gradient) and must be ignored.
    """
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    size_p, size_q = probs.sum(dims), onehot.sum(dims)
    present = size_q > 0
    # the denominator is >= sum q >= 1 where the class is present; the clamp only keeps absent
    # pairs finite so that masking them out cannot propagate NaN gradients
    loss = 1.0 - 2.0 * inter / (size_p + size_q).clamp_min(1e-6)
    return torch.where(present, loss, torch.zeros_like(loss)), present


class SegmentationLoss(nn.Module):
    """``dice * Dice_noBG + ce * CE + focal * Focal`` from logits (or probabilities) and an integer label.

    Args:
        dice, ce, focal: weights of the terms (paper A: 1, 1, 0; paper B v0.2.0: 1, 0, 20).
        gamma: focal exponent.
        include_background: include class 0 in the Dice term (paper A's checkpointing quirk; off).

    ``forward(input, target, input_is_prob=False, reduction="mean")`` with input ``(B, C, *S)``
    and target ``(B, 1, *S)`` (or ``(B, *S)``) class indices returns a dict: ``loss`` and one
    ``loss_<term>`` per enabled term. ``reduction="mean"`` averages Dice over all present
    (sample, class) pairs of the batch and CE/focal over all voxels; ``"none"`` returns ``(B,)``
    per-sample values (Dice averaged over the sample's present classes, 0 if it has none).
    """

    def __init__(
        self, dice: float = 1.0, ce: float = 1.0, focal: float = 0.0, gamma: float = 2.0, include_background: bool = False
    ) -> None:
        super().__init__()
        self.weights = {"dice": float(dice), "ce": float(ce), "focal": float(focal)}
        self.gamma = float(gamma)
        self.include_background = bool(include_background)
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError("at least one loss weight must be positive")

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, input_is_prob: bool = False, reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        num_classes = input.shape[1]
        if target.ndim == input.ndim:
            target = target[:, 0]
        onehot = torch.nn.functional.one_hot(target.long(), num_classes).movedim(-1, 1).to(torch.float32)
        if input_is_prob:
            probs = input.float()
            log_probs = probs.clamp_min(1e-7).log()
        else:
            log_probs = torch.log_softmax(input.float(), dim=1)
            probs = log_probs.exp()
        out: dict[str, torch.Tensor] = {}
        if self.weights["dice"] > 0:
            d, present = dice_loss_per_class(probs, onehot, self.include_background)
            if reduction == "mean":
                out["loss_dice"] = d.sum() / present.sum().clamp_min(1)
            else:
                out["loss_dice"] = d.sum(1) / present.sum(1).clamp_min(1)
        voxel_dims = tuple(range(1, probs.ndim - 1))  # after summing over classes
        if self.weights["ce"] > 0:
            ce = -(onehot * log_probs).sum(1)
            out["loss_ce"] = ce.mean() if reduction == "mean" else ce.mean(voxel_dims)
        if self.weights["focal"] > 0:
            focal = -(onehot * (1.0 - probs).pow(self.gamma) * log_probs).sum(1)
            out["loss_focal"] = focal.mean() if reduction == "mean" else focal.mean(voxel_dims)
        out["loss"] = sum(self.weights[k[5:]] * v for k, v in out.items())
        return out
