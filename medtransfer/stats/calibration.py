"""Calibration: do predicted probabilities mean what they say?

- :func:`ece` / :func:`reliability_curve`: expected calibration error and the binned curve behind it.
- :func:`brier`: mean squared error of probabilities (equals ``sklearn.metrics.brier_score_loss``).
- :func:`fit_temperature` / :func:`apply_temperature`: temperature scaling (Guo et al. 2017), one scalar
  T fitted on validation logits by minimising NLL; it rescales confidence without changing rankings, so
  AUROC is untouched. The fitted T is learned state: it belongs in the model card, not the config.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax

from medtransfer.data.spec import TASKS
from medtransfer.stats.metrics import clean_binary

logger = logging.getLogger(__name__)

#: Search range for the temperature; an optimum on its edge is reported with a warning.
T_BOUNDS = (0.05, 20.0)


def _bin_ids(p: np.ndarray, n_bins: int, adaptive: bool) -> np.ndarray:
    """Bin index (N,) per probability.

    Equal-width: bins [k/n, (k+1)/n), the last one closed at 1. Adaptive (equal-mass, Nixon et al. 2019):
    rows sorted by probability and split into ``n_bins`` near-equal counts (tied probabilities may be
    split across neighbouring bins, which keeps the bins equal in mass).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    if not adaptive:
        return np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)
    ids = np.empty(p.size, dtype=np.int64)
    for k, chunk in enumerate(np.array_split(np.argsort(p, kind="mergesort"), n_bins)):
        ids[chunk] = k
    return ids


def _binned(y: np.ndarray, p: np.ndarray, n_bins: int, adaptive: bool) -> pd.DataFrame:
    """Per-bin count, mean probability, observed fraction positive and probability range."""
    ids = _bin_ids(p, n_bins, adaptive)
    frame = pd.DataFrame({"bin": ids, "p": p, "y": y})
    g = frame.groupby("bin", sort=True)
    out = pd.DataFrame(
        {
            "count": g.size(),
            "mean_predicted": g["p"].mean(),
            "fraction_positive": g["y"].mean(),
            "p_min": g["p"].min(),
            "p_max": g["p"].max(),
        }
    )
    return out.reindex(range(n_bins)).fillna({"count": 0}).astype({"count": np.int64})


def _check_probabilities(p: np.ndarray) -> None:
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(
            f"calibration needs probabilities in [0, 1]; got scores in [{p.min():.3g}, {p.max():.3g}] "
            "(logits? apply a sigmoid/softmax, or apply_temperature, first)"
        )


def ece(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10, adaptive: bool = False) -> float:
    """Expected calibration error: sum over bins of (bin share) x |mean probability - fraction positive|.

    Args:
        y: labels (N,) in {0, 1}; NaN rows dropped.
        p: probabilities (N,) in [0, 1] for the positive class.
        n_bins: number of bins.
        adaptive: False = equal-width bins over [0, 1]; True = equal-mass bins (same number of cases
            each), which is less dominated by a few sparse high-confidence bins.

    Returns:
        ECE in [0, 1]; NaN for no labelled rows.

    Examples:
        >>> round(ece(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])), 3)
        0.0
    """
    y, p, _ = clean_binary(y, p)
    _check_probabilities(p)
    if not y.size:
        return float("nan")
    bins = _binned(y, p, n_bins, adaptive)
    used = bins[bins["count"] > 0]
    gap = (used["mean_predicted"] - used["fraction_positive"]).abs()
    return float((used["count"] * gap).sum() / y.size)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Brier score, mean of (p - y)^2 over labelled rows (N,); 0 is perfect. NaN for no labelled rows."""
    y, p, _ = clean_binary(y, p)
    _check_probabilities(p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def reliability_curve(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width reliability diagram data.

    Args:
        y: labels (N,) in {0, 1}; NaN rows dropped. p: probabilities (N,) in [0, 1]. n_bins: bins.

    Returns:
        One row per bin (all ``n_bins``, so plots line up): ``bin_lower, bin_upper, mean_predicted,
        fraction_positive, count``; empty bins have count 0 and NaN means.
    """
    y, p, _ = clean_binary(y, p)
    _check_probabilities(p)
    bins = _binned(y, p, n_bins, adaptive=False)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "mean_predicted": bins["mean_predicted"].to_numpy(),
            "fraction_positive": bins["fraction_positive"].to_numpy(),
            "count": bins["count"].to_numpy(),
        }
    )


def _nll_function(logits: np.ndarray, targets: np.ndarray, task: str):
    """NLL(T) for the task plus whether a fit is meaningful (both outcomes present), or a reason why not."""
    if task == "multiclass":
        z = np.asarray(logits, dtype=np.float64)
        t = np.asarray(targets).reshape(-1).astype(np.int64)
        if z.ndim != 2 or z.shape[0] != t.size:
            raise ValueError(f"multiclass logits must be (N, K) with N targets; got {z.shape} and {t.size}")
        if np.unique(t).size < 2:
            return None, "only one class among the validation targets"
        return (lambda temp: -log_softmax(z / temp, axis=1)[np.arange(t.size), t].mean()), None
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(-1) if task == "binary" else z
    y = np.asarray(targets, dtype=np.float64).reshape(z.shape)
    known = ~np.isnan(y)
    zk, yk = z[known], y[known]
    cols = [c for c in range(y.shape[1]) if 0 < np.nansum(y[:, c]) < known[:, c].sum()] if y.ndim == 2 else []
    if (task == "binary" and not 0 < yk.sum() < yk.size) or (task == "multilabel" and not cols):
        return None, "no label has both outcomes among the validation targets"

    def nll(temp: float) -> float:
        s = zk / temp
        return float(-(yk * log_expit(s) + (1 - yk) * log_expit(-s)).mean())

    return nll, None


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str) -> float:
    """Fit one temperature T on validation logits by minimising the negative log-likelihood.

    Args:
        logits: binary (N,) or (N, 1) (sigmoid); multiclass (N, K) (softmax); multilabel (N, K) (sigmoid,
            one T shared by all labels).
        targets: binary (N,) in {0, 1}; multiclass (N,) int class index; multilabel (N, K) in {0, 1} with
            NaN = unknown (masked out of the fit).
        task: ``binary``, ``multiclass`` or ``multilabel``.

    Returns:
        T in ``T_BOUNDS`` (> 1 softens overconfident models). 1.0, with a warning, when it cannot be fitted
        (only one outcome present). An optimum on the search boundary is returned with a warning.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(0, 2, 2000); y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(float)
        >>> 2.5 < fit_temperature(3 * z, y, "binary") < 3.5  # logits made 3x overconfident
        True
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    nll, reason = _nll_function(logits, targets, task)
    if nll is None:
        warnings.warn(f"temperature scaling skipped ({reason}); using T = 1.0", stacklevel=2)
        return 1.0
    # Optimise log T: NLL is far better conditioned in log T than in T across [0.05, 20].
    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(
        lambda u: nll(np.exp(u)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-5}
    )
    temp = float(np.exp(res.x))
    if np.isclose(res.x, lo, atol=1e-3) or np.isclose(res.x, hi, atol=1e-3):
        warnings.warn(
            f"fitted temperature {temp:.3g} lies on the search boundary {T_BOUNDS}: the validation set may "
            "be separable (T -> 0) or the scores uninformative (T -> inf); treat calibration with care",
            stacklevel=2,
        )
    logger.info("temperature scaling: T = %.4f (NLL %.4f -> %.4f)", temp, nll(1.0), res.fun)
    return temp
