"""Validation metric of the bundle: mean Dice over the foreground classes (checkpoint selection).

Per case the Dice of every class c >= 1 is computed with ``common.metrics.segmentation.dice``
(NaN iff prediction and reference are both empty, 0 if exactly one is); the case score is the
NaN-mean over classes and the reported value the mean over cases. Paper A's code selected on the
Dice *with* background (spec pitfall 1); MONAI's ``DiceMetric(ignore_empty=True)`` would score a
false-positive class on an empty reference as NaN instead of 0 (pitfall 11).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

from common.metrics.segmentation import dice

__all__ = ["DiceNoBackgroundMetric"]


class DiceNoBackgroundMetric(CumulativeIterationMetric):
    """``metric(y_pred, y)`` on label maps ``(B, 1, *S)``; ``aggregate()`` -> mean case score (float tensor).

    Buffers are gathered across ranks by ``Cumulative``, so multi-GPU validation scores all cases.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = []
        for p, g in zip(y_pred, y):
            p, g = p.reshape(p.shape[-3:]) if p.ndim > 3 else p, g.reshape(g.shape[-3:]) if g.ndim > 3 else g
            rows.append([dice(p == c, g == c) for c in range(1, self.num_classes)])
        return torch.tensor(rows, dtype=torch.float64, device=y_pred.device)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(float("nan"))
        per_class = data.reshape(-1, self.num_classes - 1).cpu().numpy()
        valid = ~np.isnan(per_class).all(axis=1)
        if not valid.any():
            return torch.tensor(float("nan"))
        case_scores = np.nanmean(per_class[valid], axis=1)
        return torch.tensor(float(case_scores.mean()))
