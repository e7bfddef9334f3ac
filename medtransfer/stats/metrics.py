"""Discrimination metrics shared by training (early stopping) and evaluation.

Scores are probabilities as the model card defines them: binary → one column, P(classes[1]);
multi-class → softmax over classes; multi-label → one sigmoid per class.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
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


# --------------------------------------------------------------------------------------------------
# Binary building blocks for evaluation. Multi-class / multi-label tasks are evaluated one-vs-rest,
# per class, by the caller. One weighted implementation serves both the point estimate (weights = 1)
# and the bootstrap (weights = how often each row was drawn), so the two can never disagree.
# --------------------------------------------------------------------------------------------------

THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
RANKING_METRICS = ("auroc", "auprc")
BINARY_METRICS = RANKING_METRICS + THRESHOLD_METRICS
#: Threshold metrics that are a proportion of rows (successes / denominator): they get score intervals
#: (:mod:`medtransfer.stats.intervals`). F1 is not a proportion of rows and keeps the bootstrap.
PROPORTION_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")


def proportion_masks(
    y: np.ndarray, p: np.ndarray, threshold: float, metrics: tuple[str, ...] | list[str] = PROPORTION_METRICS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Which rows count as a success and which in the denominator, per proportion metric.

    The row-level form of the rates in :func:`weighted_binary_metrics` (the same definitions), for intervals
    that need to know which patient each success and each denominator row belongs to.

    Args:
        y: clean labels (N,) in {0, 1} (see :func:`clean_binary`). p: scores (N,); prediction is
            ``p >= threshold``. threshold: operating point. metrics: names from :data:`PROPORTION_METRICS`.

    Returns:
        name -> ``(success (N,) bool, denominator (N,) bool)``; the proportion is success.sum() / denom.sum().

    Examples:
        >>> ok, den = proportion_masks(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), 0.5)["sensitivity"]
        >>> int(ok.sum()), int(den.sum())
        (1, 2)
    """
    unknown = set(metrics) - set(PROPORTION_METRICS)
    if unknown:
        raise ValueError(
            f"unknown proportion metrics {sorted(unknown)}; choose from {list(PROPORTION_METRICS)}"
        )
    pos = np.asarray(y) == 1
    pred = np.asarray(p) >= threshold
    masks = {
        "sensitivity": (pos & pred, pos),
        "specificity": (~pos & ~pred, ~pos),
        "ppv": (pos & pred, pred),
        "npv": (~pos & ~pred, ~pred),
        "accuracy": (pos == pred, np.ones_like(pos)),
    }
    return {name: masks[name] for name in metrics}


def clean_binary(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one binary column and drop rows whose label is unknown.

    Args:
        y: labels (N,) in {0, 1}; NaN = unknown (multi-label blanks), dropped.
        p: scores (N,), usually probabilities in [0, 1]; must be finite where y is known.

    Returns:
        ``(y, p, keep)``: labels as float (M,), scores as float (M,), and the boolean mask (N,) of kept rows.

    Raises:
        ValueError: lengths differ, labels outside {0, 1}, or scores NaN/inf for a labelled row.
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} labels, {p.size} scores")
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"binary labels must be 0, 1 or NaN (unknown); got {np.unique(y[bad])[:5].tolist()}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} scores are NaN or infinite for labelled rows")
    return y, p, keep


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (an undefined rate is never reported as 0 or 1)."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _tie_groups(p_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ascending scores (N,): start (U,) and end (U,) positions of each run of equal scores."""
    new = np.r_[True, p_sorted[1:] != p_sorted[:-1]]
    start = np.flatnonzero(new)
    end = np.r_[start[1:], p_sorted.size]
    return start, end


def _ranking_metrics(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Weighted AUROC and average precision for B weight vectors at once.

    AUROC is the Mann-Whitney statistic (ties count one half); average precision is
    sum_k (R_k - R_{k-1}) P_k over distinct thresholds, as scikit-learn computes it. Both come from one
    ascending sort and weighted cumulative sums, so B resamples cost a few (B, N) array passes.

    Args:
        y: labels (N,) in {0, 1}. p: scores (N,). weights: (B, N) >= 0. names: subset of RANKING_METRICS.
    """
    order = np.argsort(p, kind="mergesort")
    ys = y[order].astype(bool)
    start, end = _tie_groups(p[order])
    w = weights[:, order]
    b, n = w.shape
    cum_neg = np.zeros((b, n + 1))  # (B, N+1): weighted negatives below each position
    np.cumsum(w * ~ys, axis=1, out=cum_neg[:, 1:])
    tot_neg, tot_pos = cum_neg[:, -1], w @ ys.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    if "auroc" in names:
        group_of = np.repeat(np.arange(start.size), end - start)[ys]  # tie group of each positive
        below = cum_neg[:, start[group_of]]
        tied = cum_neg[:, end[group_of]] - below
        wins = np.einsum("bi,bi->b", w[:, ys], below + 0.5 * tied)
        out["auroc"] = _ratio(wins, tot_pos * tot_neg)
    if "auprc" in names:
        cum_pos = np.zeros((b, n + 1))  # only AUPRC needs the positives' running total
        np.cumsum(w * ys, axis=1, out=cum_pos[:, 1:])
        tp = tot_pos[:, None] - cum_pos[:, start]  # (B, U): positives scored >= each distinct score
        fp = tot_neg[:, None] - cum_neg[:, start]
        d_recall = cum_pos[:, end] - cum_pos[:, start]
        precision = _ratio(tp, tp + fp)
        out["auprc"] = _ratio(np.nansum(d_recall * precision, axis=1), tot_pos)
    return out


def weighted_binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    weights: np.ndarray,
    metrics: tuple[str, ...] | list[str] = BINARY_METRICS,
) -> dict[str, np.ndarray]:
    """Binary metrics under B row-weightings at once (the engine of both point estimates and bootstrap).

    Args:
        y: clean labels (N,) in {0, 1} (see :func:`clean_binary`).
        p: scores (N,); prediction is ``p >= threshold``.
        threshold: operating point.
        weights: (B, N) non-negative; row b counts how often each case is in resample b (ones = the data).
        metrics: names from :data:`BINARY_METRICS`, plus the counts ``tp fp tn fn`` which are always returned.

    Returns:
        name -> (B,) float array; NaN where a metric is undefined for that weighting.
    """
    unknown = set(metrics) - set(BINARY_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(BINARY_METRICS)}")
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pos = y == 1
    pred = p >= threshold
    tp, fn = w @ (pos & pred), w @ (pos & ~pred)
    fp, tn = w @ (~pos & pred), w @ (~pos & ~pred)
    out = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    rates = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
        "accuracy": (tp + tn, tp + tn + fp + fn),
    }
    out.update({name: _ratio(*rates[name]) for name in metrics if name in rates})
    ranking = tuple(m for m in metrics if m in RANKING_METRICS)
    if ranking and y.size:
        out.update(_ranking_metrics(y, p, w, ranking))
    elif ranking:
        out.update({m: np.full(w.shape[0], np.nan) for m in ranking})
    return out


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Discrimination and operating-point metrics for one binary outcome.

    Args:
        y: labels (N,) in {0, 1}; NaN rows (unknown labels) are dropped.
        p: probabilities (N,) in [0, 1]; the prediction is ``p >= threshold``.
        threshold: operating point, usually from :func:`medtransfer.stats.thresholds.choose_threshold`.

    Returns:
        ``n, n_pos, tp, fp, tn, fn`` (int) and ``prevalence, auroc, auprc`` (average precision),
        ``sensitivity, specificity, ppv, npv, f1, accuracy`` (float). Undefined values are NaN, never a
        misleading 0 or 1: AUROC/AUPRC need both classes (AUPRC needs a positive), PPV needs a predicted
        positive, F1 needs a positive or a predicted positive (where scikit-learn would say 0).

    Examples:
        >>> m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), 0.5)
        >>> m["auroc"], m["sensitivity"], m["ppv"]
        (0.75, 0.5, 0.5)
    """
    y, p, _ = clean_binary(y, p)
    res = weighted_binary_metrics(y, p, threshold, np.ones((1, y.size)))
    out: dict[str, float] = {"n": int(y.size), "n_pos": int(y.sum())}
    out["prevalence"] = float(y.mean()) if y.size else float("nan")
    out.update({k: float(res[k][0]) for k in BINARY_METRICS})
    out.update({k: int(round(res[k][0])) for k in ("tp", "fp", "tn", "fn")})
    return out


def fast_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank formula (ties averaged); equals ``sklearn.metrics.roc_auc_score``.

    About ten times cheaper than scikit-learn for small arrays (no ROC curve is built), which matters
    inside resampling loops and per-group callbacks.

    Args:
        y: labels (N,) in {0, 1}; NaN rows dropped. p: scores (N,).

    Returns:
        AUROC in [0, 1], or NaN when only one class is present.
    """
    y, p, _ = clean_binary(y, p)
    n_pos = float(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
