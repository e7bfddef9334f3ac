"""Discrimination metrics shared by training (early stopping) and evaluation.

Scores are probabilities as the model card defines them: binary → one column, P(classes[1]);
multi-class → softmax over classes; multi-label → one sigmoid per class.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def scores_to_matrix(scores: np.ndarray, task: str) -> np.ndarray:
    """Scores as (N, C): binary (N,) or (N, 1) → (N, 2) with columns [1-p, p]; otherwise unchanged."""
    s = np.asarray(scores, dtype=np.float64)
    if task == "binary":
        p = s.reshape(-1)
        return np.stack([1 - p, p], axis=1)
    return s


def targets_to_matrix(targets: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """Targets as one-hot/multi-hot (N, C) float with NaN for unknown (multi-label)."""
    t = np.asarray(targets)
    if task == "multilabel":
        return t.astype(np.float64)
    idx = t.reshape(-1).astype(np.int64)
    out = np.zeros((len(idx), n_classes), dtype=np.float64)
    out[np.arange(len(idx)), idx] = 1.0
    return out


def per_class_auroc(targets: np.ndarray, scores: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """One-vs-rest AUROC per class; NaN where a class has only one outcome among known labels."""
    y = targets_to_matrix(targets, task, n_classes)
    s = scores_to_matrix(scores, task)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        known = ~np.isnan(y[:, c])
        yc = y[known, c]
        if yc.size and 0 < yc.sum() < yc.size:
            out[c] = roc_auc_score(yc, s[known, c])
    return out


def macro_auroc(targets: np.ndarray, scores: np.ndarray, task: str, n_classes: int) -> float:
    """The early-stopping metric: AUROC of the positive class (binary) or the macro mean over classes.

    Returns NaN when no class has both outcomes (e.g. a validation split without positives).
    """
    per = per_class_auroc(targets, scores, task, n_classes)
    if task == "binary":
        return float(per[1])
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
