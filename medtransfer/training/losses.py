"""Losses for the three task types, with class weighting and masking of unknown labels.

- binary: BCE-with-logits on one output, ``pos_weight = n_neg / n_pos`` when class weighting is on
  (CheXNet's weighted BCE);
- multi-class: cross-entropy with inverse-frequency class weights and optional label smoothing;
- multi-label: BCE per class with per-class ``pos_weight``; unknown (NaN) labels are masked out and the
  loss is averaged over known entries only (CheXpert's "ignore uncertain" policy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TaskLoss(nn.Module):
    """Loss for ``task`` given logits (N, K) and targets as ``Manifest.targets()`` returns them."""

    def __init__(self, task: str, *, pos_weight: torch.Tensor | None = None,
                 class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.task = task
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight)
        self.register_buffer("class_weight", class_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "multiclass":
            return F.cross_entropy(logits, targets.long(), weight=self.class_weight,
                                   label_smoothing=self.label_smoothing)
        y = targets.float().reshape(logits.shape)
        mask = ~torch.isnan(y)
        y = torch.nan_to_num(y, nan=0.0)
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight, reduction="none")
        loss = loss * mask
        return loss.sum() / mask.sum().clamp(min=1)


def build_loss(task: str, targets: np.ndarray, n_classes: int, *, class_weights: bool = True,
               label_smoothing: float = 0.0) -> TaskLoss:
    """A :class:`TaskLoss` with weights computed from the training targets.

    Args:
        task: binary / multiclass / multilabel.
        targets: training targets as ``Manifest.targets()`` returns them.
        n_classes: number of classes.
        class_weights: weight rare classes up (off: plain losses).
        label_smoothing: towards 0.5 (sigmoid tasks) or uniform (softmax).
    """
    pos_weight = class_weight = None
    if class_weights:
        if task == "multiclass":
            counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_classes).astype(np.float64)
            w = counts.sum() / np.maximum(counts, 1) / n_classes
            class_weight = torch.tensor(w, dtype=torch.float32)
        else:
            y = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
            pos = np.nansum(y, axis=0)
            neg = np.sum(~np.isnan(y), axis=0) - pos
            pos_weight = torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    return TaskLoss(task, pos_weight=pos_weight, class_weight=class_weight, label_smoothing=label_smoothing)


def logits_to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities from logits: sigmoid for binary/multi-label (binary → (N,)), softmax for multi-class."""
    if task == "multiclass":
        return torch.softmax(logits.float(), dim=1)
    p = torch.sigmoid(logits.float())
    return p.reshape(-1) if task == "binary" else p
